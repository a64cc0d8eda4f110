"""One package per domain: reasoning, multimodal, diffusion, continual. Each holds its
LightningModules, model builders, metrics, reports, callbacks and commands; all build on the
shell's `TaskModule` / `AdapterModule`."""
