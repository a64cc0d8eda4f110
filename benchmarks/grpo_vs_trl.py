"""GRPO side by side: TRL's GRPOTrainer with a peft LoRA against our GRPOTask, same model, prompts,
rewards, G, learning rate and steps; the reward they reach and their seconds per step.

    make bench-rl   # builds .venv-trl (TRL is a dev-only dependency), then runs:
    .venv-trl/bin/python benchmarks/grpo_vs_trl.py --steps 30 --output docs/benchmarks_rl.md
    .venv-trl/bin/python benchmarks/grpo_vs_trl.py --steps 30 --seed 1 --output docs/benchmarks_rl_seed1.md
    # per-step rewards go to runs/grpo_vs_trl-s<seed>.json (--curves), for scripts/rl_curves.py

Both runs: SmolLM2-135M-Instruct (the packaged asset), LoRA r8 alpha 16 (no dropout) on every
attention and MLP linear, 4 prompts a step from `VerifiedPrompts` (chain_sum and letter_counting
at the demo's difficulty, the same chat template and instruction), G = 8 completions of at most
24 tokens at temperature 1, rewards from the tasks' reasoning-gym verifiers on the completion's
last number plus 0.5 for the '#### ' line (`rewards.score_completions`, the same function on both
sides), GRPO loss and advantages, beta 0.02, AdamW lr 2e-4, one update per rollout, gradient
clipping at 1, no activation checkpointing (TRL turns it on by default), 2 threads, fp32. The
runs take turns, never together. Seconds per step: the median time between consecutive steps
(the first step, with its warm-up, left out). Reward: the mean training reward of the last 10
steps, and of the first 5 (each side samples its own completions, so the curves are noisy; the
same prompts in the same order on both sides).
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import UTC, datetime
from importlib.metadata import version
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
STEPS_DEFAULT, PROMPTS, GROUP, NEW_TOKENS, LR, BETA, FORMAT_WEIGHT = 30, 4, 8, 24, 2e-4, 0.02, 0.5
CONFIG = REPO / "configs/rl/grpo_smollm2.yaml"


def data_module():
    from lightning_moe.data.verified_prompts import VerifiedPrompts

    # the settings of configs/rl/grpo_smollm2.yaml
    data = VerifiedPrompts(
        tasks=["chain_sum", "letter_counting"],
        task_options={
            "chain_sum": {"min_terms": 2, "max_terms": 2, "min_digits": 1, "max_digits": 2},
            "letter_counting": {"min_words": 3, "max_words": 4},
        },
        instruction="Reply with only the final answer, as '#### <answer>'.",
        train_size=1000,
        val_size=32,
        test_size=200,
        batch_size=PROMPTS,
    )
    data.setup("fit")
    return data


def run_trl(steps: int, folder: Path, seed: int) -> list[tuple[float, float]]:
    """(wall time at the end of each step, mean reward of its rollout) of TRL's GRPOTrainer."""
    import torch
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    from trl import GRPOConfig, GRPOTrainer

    from lightning_moe.assets import resolve_pretrained
    from lightning_moe.tasks.reasoning.rewards import score_completions

    torch.set_num_threads(2)
    data = data_module()
    order = [index for batch in data.train_dataloader().batch_sampler for index in batch][: steps * PROMPTS]
    examples = [data.splits["train"][index] for index in order]
    verifier = data.verifier()
    rows = [
        {
            "prompt": [{"role": "user", "content": e.prompt_text}],
            "task": e.domain,
            "entry": json.dumps(e.entry),
        }
        for e in examples
    ]

    def reward(completions, task, entry, **_):
        texts = [completion[0]["content"] for completion in completions]
        entries = [json.loads(item) for item in entry]
        return score_completions(
            texts, task, entries, ["?"] * len(texts), verifier, FORMAT_WEIGHT, "last_number"
        ).total.tolist()

    path = resolve_pretrained("smollm2-135m-instruct")
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(path)
    tokenizer.padding_side = "left"
    settings = GRPOConfig(
        output_dir=str(folder),
        per_device_train_batch_size=PROMPTS * GROUP,
        num_generations=GROUP,
        max_completion_length=NEW_TOKENS,
        temperature=1.0,
        top_p=1.0,
        top_k=0,
        learning_rate=LR,
        lr_scheduler_type="constant",
        warmup_steps=0,
        weight_decay=0.0,
        beta=BETA,
        loss_type="grpo",
        max_grad_norm=1.0,
        gradient_checkpointing=False,  # TRL's default is on; ours does not recompute activations
        max_steps=steps,
        logging_steps=1,
        save_strategy="no",
        report_to=[],
        use_cpu=True,
        bf16=False,
        seed=seed,
        shuffle_dataset=False,
    )
    log: list[tuple[float, float]] = []

    class Clock(TrainerCallback):
        def on_log(self, args, state, control, logs=None, **kwargs):
            if logs and "reward" in logs:
                log.append((time.perf_counter(), float(logs["reward"])))

    trainer = GRPOTrainer(
        model=model,
        reward_funcs=[reward],
        args=settings,
        train_dataset=Dataset.from_list(rows),
        processing_class=tokenizer,
        peft_config=LoraConfig(r=8, lora_alpha=16, lora_dropout=0.0, target_modules="all-linear"),
        callbacks=[Clock()],
    )
    trainer.train()
    return log


def run_ours(steps: int, folder: Path, seed: int) -> list[tuple[float, float]]:
    """The same from our CLI (a subprocess), read back from its TensorBoard events."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    command = [
        sys.executable, "-m", "lightning_moe", "fit", "--config", str(CONFIG),
        f"--trainer.max_steps={steps}", f"--seed_everything={seed}", "--trainer.limit_val_batches=0", "--trainer.num_sanity_val_steps=0",
        "--trainer.callbacks=[]", f"--trainer.logger.init_args.save_dir={folder}",
        "--trainer.enable_progress_bar=false", "--model.init_args.completions_to_log=0",
        "--model.init_args.adapters=[{targets: [q_proj, k_proj, v_proj, o_proj, gate_proj, up_proj, down_proj], "
        "adapter: {kind: lora, rank: 8, alpha: 16}}]",
    ]  # fmt: skip
    subprocess.run(command, cwd=REPO, check=True)
    (events_folder,) = {path.parent for path in folder.rglob("events.out.tfevents.*")}
    events = EventAccumulator(str(events_folder)).Reload()
    return [(event.wall_time, event.value) for event in events.Scalars("train/reward")]


def summary(log: list[tuple[float, float]]) -> dict[str, float]:
    gaps = [later - earlier for (earlier, _), (later, _) in zip(log[1:], log[2:], strict=False)]
    rewards = [reward for _, reward in log]
    return {
        "seconds_per_step": statistics.median(gaps),
        "reward_first_5": statistics.mean(rewards[:5]),
        "reward_last_10": statistics.mean(rewards[-10:]),
        "steps": len(log),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=STEPS_DEFAULT)
    parser.add_argument("--output", type=Path, default=None)
    parser.add_argument("--seed", type=int, default=0, help="both sides' seed (the prompt order is fixed)")
    parser.add_argument("--curves", type=Path, default=None, help="per-step rewards, for the figure")
    args = parser.parse_args()
    args.curves = args.curves or REPO / f"runs/grpo_vs_trl-s{args.seed}.json"
    logs = {}
    with tempfile.TemporaryDirectory() as scratch:
        logs["ours GRPOTask"] = run_ours(args.steps, Path(scratch) / "ours", args.seed)
        logs["TRL GRPOTrainer + peft"] = run_trl(args.steps, Path(scratch) / "trl", args.seed)
    args.curves.parent.mkdir(parents=True, exist_ok=True)
    args.curves.write_text(json.dumps({name: [reward for _, reward in log] for name, log in logs.items()}))
    results = {name: summary(log) for name, log in logs.items()}
    trl_seconds = results["TRL GRPOTrainer + peft"]["seconds_per_step"]
    lines = [
        "# GRPO: ours against TRL",
        "",
        f"Command: `.venv-trl/bin/python benchmarks/grpo_vs_trl.py --steps {args.steps} --seed {args.seed}`",
        f"Machine: {platform.machine()}, 2 threads, torch {version('torch')}, transformers {version('transformers')}, "
        f"trl {version('trl')}, peft {version('peft')}, {datetime.now(UTC):%Y-%m-%d}. {PROMPTS} prompts x G = {GROUP}, "
        f"{NEW_TOKENS} new tokens, lr {LR}, beta {BETA}, {args.steps} steps (see the script's docstring).",
        "",
        "| run | s / step | × TRL | reward, first 5 steps | reward, last 10 steps |",
        "|---|---:|---:|---:|---:|",
    ]
    for name, result in results.items():
        lines.append(
            f"| {name} | {result['seconds_per_step']:.2f} | {result['seconds_per_step'] / trl_seconds:.2f} "
            f"| {result['reward_first_5']:.3f} | {result['reward_last_10']:.3f} |"
        )
    report = "\n".join(lines) + "\n"
    print(report)
    if args.output:
        args.output.write_text(report)


if __name__ == "__main__":
    main()
