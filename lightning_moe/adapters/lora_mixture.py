"""What the mixtures of pre-trained LoRAs (kinds `xlora`, `meteora`) share: K trained LoRAs,
frozen and packed, mixed per token by a trained gate, in one forward pass.

Packing. At each adapted layer, expert k's factors (scaling folded into B) are zero-padded to the
largest rank among the experts there and stacked as A: [K, r, in], B: [K, out, r]; an expert that
does not adapt the layer holds zeros. Zero rows of A and zero columns of B add nothing, so the
padded stack computes exactly each expert's update, and one tensor per layer lets every expert
backend run without a loop over adapters (dense: one matmul to K*r ranks and one back). The
price is K*r - sum(r_k) idle ranks, small for a family of LoRAs from one recipe; grouping experts
by rank would avoid it at the cost of one matmul pair per group.

One pass. The reference X-LoRA runs the whole model twice per step: once with the adapters
off to get the last hidden states, from which its classifier predicts every layer's mixing
weights, and again with those weights. Here the gate of each adapted layer reads that layer's own
input, which exists when the layer runs, so the base model runs once. A deep layer's gate still
sees context (its input has passed through every earlier block); the weights are therefore per
layer, as in the reference's `layerwise_scalings` mode. Expert weights are frozen buffers, not
parameters: checkpoints hold the gates plus the expert folders and their content hashes.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from .adapter_folder import check_fingerprints, layer_fingerprint
from .backends import Backend, expert_backend
from .base import Adapter, AdapterConfig
from .errors import AdapterCheckpointError, AdapterConfigError
from .lora_factors import PretrainedLora, check_factor_shapes, read_pretrained_lora


@dataclass
class LoraMixtureConfig(AdapterConfig):
    """Fields shared by X-LoRA and MeteoRA (see `XLoraConfig` for their meaning). Ranks, alphas
    and target sets come from the expert folders."""

    experts: list[str] = field(default_factory=list)
    expert_sha256: list[str] | None = None
    top_k: int | None = None
    temperature: float = 1.0
    gate_hidden: int = 0
    gate_dropout: float = 0.0
    fixed_weights: list[float] | None = None
    expert_tasks: list[str] | None = None
    backend: Backend = "auto"

    def __post_init__(self) -> None:
        count = len(self.experts)
        if count == 0:
            raise AdapterConfigError("a LoRA mixture needs expert adapter folders, got experts=[]")
        if len(set(self.experts)) != count:
            raise AdapterConfigError(f"experts must be distinct folders, got {self.experts}")
        for option in ("expert_sha256", "fixed_weights", "expert_tasks"):
            value = getattr(self, option)
            if value is not None and len(value) != count:
                raise AdapterConfigError(
                    f"{option} needs one entry per expert ({count}), got {len(value)}: {value}"
                )
        if self.top_k is not None and not 1 <= self.top_k <= count:
            raise AdapterConfigError(
                f"top_k must be between 1 and the {count} experts, got top_k={self.top_k}"
            )
        if self.temperature <= 0:
            raise AdapterConfigError(f"temperature must be > 0, got temperature={self.temperature}")
        if self.gate_hidden < 0 or not 0.0 <= self.gate_dropout < 1.0:
            raise AdapterConfigError(
                f"gate_hidden must be >= 0 and gate_dropout in [0, 1), got {self.gate_hidden} and {self.gate_dropout}"
            )

    @property
    def num_experts(self) -> int:
        return len(self.experts)


class MixtureGate(nn.Module):
    """Per-token logits over K experts: a linear layer, or an MLP with one hidden layer.

    With `uniform_start` the output layer starts at zero, so every token starts with equal
    weights: the mixture begins as the merged average of its experts.
    """

    def __init__(
        self,
        in_features: int,
        num_experts: int,
        hidden: int = 0,
        dropout: float = 0.0,
        uniform_start: bool = False,
        device: torch.device | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        factory = {"device": device, "dtype": dtype}
        output = nn.Linear(hidden or in_features, num_experts, **factory)
        if uniform_start:
            nn.init.zeros_(output.weight)
            nn.init.zeros_(output.bias)
        if hidden:
            self.net = nn.Sequential(
                nn.Linear(in_features, hidden, **factory), nn.ReLU(), nn.Dropout(dropout), output
            )
        else:
            self.net = output

    def forward(self, x: Tensor) -> Tensor:
        logits = self.net(x)
        return logits.to(torch.promote_types(logits.dtype, torch.float32))  # bf16 up, float64 stays


class LoraMixtureAdapter(Adapter):
    """A gate over K frozen, packed LoRA experts: the delta of one adapted linear layer.

    The experts arrive through `set_experts` (see `prepare`). The gate reports its logits and
    each token's chosen (or, when all experts mix, dominant) expert to the routing collector;
    with `fixed_weights` there is no gate and the update is input-independent, so it can be
    merged into the base weight.
    """

    routed = True

    def __init__(self, base_layer: nn.Linear, config: LoraMixtureConfig) -> None:
        super().__init__(base_layer, config)
        weight = base_layer.weight
        factory = {"device": weight.device, "dtype": weight.dtype}
        experts = config.num_experts
        self.register_buffer(
            "expert_A", torch.zeros(experts, 0, base_layer.in_features, **factory), persistent=False
        )
        self.register_buffer(
            "expert_B", torch.zeros(experts, base_layer.out_features, 0, **factory), persistent=False
        )
        self.top_k = config.top_k
        self.temperature = config.temperature
        self.backend = config.backend
        self.gate: MixtureGate | None = None
        if config.fixed_weights is None:
            self.gate = MixtureGate(
                base_layer.in_features,
                experts,
                config.gate_hidden,
                config.gate_dropout,
                uniform_start=config.top_k is None,
                **factory,
            )
        else:
            self.register_buffer(
                "fixed_weights", torch.tensor(config.fixed_weights, **factory), persistent=False
            )

    @property
    def num_experts(self) -> int:
        return self.expert_A.shape[0]

    @property
    def mergeable(self) -> bool:
        return self.gate is None

    def router_parameters(self) -> list[nn.Parameter]:
        return list(self.gate.parameters()) if self.gate is not None else []

    @classmethod
    def prepare(cls, layers: Mapping[str, nn.Module]) -> None:
        attach_pretrained_experts(layers)

    @torch.no_grad()
    def set_experts(self, factors: list[tuple[Tensor, Tensor] | None]) -> None:
        """Pack expert k's (A [r_k, in], B [out, r_k]) into the stack; None: k does not adapt this layer."""
        rank = max(pair[0].shape[0] for pair in factors if pair is not None)
        stacked_A = self.expert_A.new_zeros(self.num_experts, rank, self.expert_A.shape[2])
        stacked_B = self.expert_B.new_zeros(self.num_experts, self.expert_B.shape[1], rank)
        for expert, pair in enumerate(factors):
            if pair is not None:
                lora_A, lora_B = pair
                stacked_A[expert, : lora_A.shape[0]] = lora_A
                stacked_B[expert, :, : lora_B.shape[1]] = lora_B
        self.expert_A, self.expert_B = stacked_A, stacked_B

    def mixing_weights(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor | None]:
        """x: [N, in] -> (indices [N, k], weights [N, k], gate logits / temperature [N, K], or None
        when the weights are fixed)."""
        every_expert = torch.arange(self.num_experts, device=x.device).expand(x.shape[0], -1)
        if self.gate is None:
            return every_expert, self.fixed_weights.expand(x.shape[0], -1), None
        logits = self.gate(x) / self.temperature  # so routing statistics see the distribution used
        probs = logits.softmax(dim=-1)
        if self.top_k is None:
            return every_expert, probs, logits
        top_probs, indices = probs.topk(self.top_k, dim=-1)
        return indices, top_probs / top_probs.sum(dim=-1, keepdim=True), logits

    def forward(self, x: Tensor) -> Tensor:
        lead_shape = x.shape[:-1]
        flat = x.reshape(-1, x.shape[-1]).to(self.expert_A.dtype)
        indices, weights, logits = self.mixing_weights(flat)
        if logits is not None:
            # the chosen experts, or with all K mixed each token's dominant one, for statistics
            chosen = indices if self.top_k is not None else weights.argmax(dim=-1, keepdim=True)
            self.report_routing(lead_shape, logits, chosen)
        compute = expert_backend(self.backend, flat, self.expert_A.shape[0], indices.shape[-1])
        delta = compute(flat, self.expert_A, self.expert_B, indices, weights.to(flat.dtype))
        return delta.view(*lead_shape, delta.shape[-1])

    def delta_weight(self) -> Tensor:
        """The fixed mixture's dense [out, in] update: sum_k w_k B_k @ A_k."""
        if self.gate is not None:
            return super().delta_weight()  # refuses: a gated mixture depends on the input
        return torch.einsum("k,kor,kri->oi", self.fixed_weights, self.expert_B, self.expert_A)


@torch.no_grad()
def set_mixture_weights(model: nn.Module, weights: list[float] | Tensor) -> int:
    """Set the constant weights of every fixed-weight LoRA mixture in `model` (e.g. to switch the
    active LoRA between denoising steps); returns how many layers changed. Gated mixtures are
    left alone; a length other than their expert count is an error."""
    changed = 0
    for module in model.modules():
        if isinstance(module, LoraMixtureAdapter) and module.gate is None:
            new = torch.as_tensor(
                weights, dtype=module.fixed_weights.dtype, device=module.fixed_weights.device
            )
            if new.shape != module.fixed_weights.shape:
                raise AdapterConfigError(
                    f"{len(new)} mixture weights given for {module.num_experts} experts ({module.layer_name})"
                )
            module.fixed_weights.copy_(new)
            changed += 1
    return changed


def fixed_mixture_size(model: nn.Module) -> int:
    """How many LoRAs the fixed-weight mixtures of `model` hold (one count for all of them)."""
    counts = {
        module.num_experts
        for module in model.modules()
        if isinstance(module, LoraMixtureAdapter) and module.gate is None
    }
    if len(counts) != 1:
        raise AdapterConfigError(
            "composing LoRAs needs fixed-weight LoRA mixtures (kind: xlora with fixed_weights) of one "
            f"expert count; the model has expert counts {sorted(counts)}"
        )
    return counts.pop()


def attach_pretrained_experts(layers: Mapping[str, nn.Module]) -> None:
    """Read each mixture's expert folders once and pack them into its layers.

    Refuses, naming the folder: a missing or unreadable folder, an expert made for another base
    (layer shapes, or our format's base fingerprint), an expert adapting a layer that no mixture
    over it targets, a targeted layer no expert adapts, and an expert whose content hash differs
    from the one recorded in the config (a changed file behind a saved gate). Unset hashes are
    filled in. Several mixtures may share experts (e.g. X-LoRA on attention, MeteoRA on the MLP).
    """
    groups: dict[int, tuple[LoraMixtureConfig, list[str]]] = {}
    for name, layer in layers.items():
        if isinstance(layer.adapter, LoraMixtureAdapter):
            groups.setdefault(id(layer.config), (layer.config, []))[1].append(name)
    read: dict[str, PretrainedLora] = {}  # one read per folder, however many mixtures use it
    mixed_at: dict[str, dict[str, nn.Module]] = {}  # folder -> the layers whose mixtures include it
    for config, names in groups.values():
        for folder in config.experts:
            if folder not in read:
                read[folder] = read_pretrained_lora(folder)
            mixed_at.setdefault(folder, {}).update({name: layers[name] for name in names})
        _check_hashes(config, [read[folder] for folder in config.experts])
    for folder, expert in read.items():
        _check_expert_fits(expert, mixed_at[folder])
    for config, names in groups.values():
        experts = [read[folder] for folder in config.experts]
        for name in names:
            if not any(name in expert.factors for expert in experts):
                raise AdapterCheckpointError(
                    f"no expert adapts layer {name!r}; target only layers the experts {config.experts} adapt"
                )
            layers[name].adapter.set_experts([expert.factors.get(name) for expert in experts])


def _check_hashes(config: LoraMixtureConfig, experts: list[PretrainedLora]) -> None:
    hashes = [expert.sha256 for expert in experts]
    if config.expert_sha256 is None:
        config.expert_sha256 = hashes
        return
    for expert, recorded in zip(experts, config.expert_sha256, strict=True):
        if expert.sha256 != recorded:
            raise AdapterCheckpointError(
                f"expert adapter {expert.folder} changed since this mixture was saved: its sha256 is "
                f"{expert.sha256[:16]}..., the mixture recorded {recorded[:16]}...; restore the expert or retrain the gate"
            )


def _check_expert_fits(expert: PretrainedLora, layers: Mapping[str, nn.Module]) -> None:
    for module, (lora_A, lora_B) in expert.factors.items():
        if module not in layers:
            raise AdapterCheckpointError(
                f"expert {expert.folder} adapts {module!r}, which is not among the {len(layers)} layers the "
                f"mixtures over it adapt (e.g. {next(iter(layers))!r}); target every layer the experts adapt, "
                "or check that the expert was trained on this base model"
            )
        check_factor_shapes(module, lora_A, lora_B, layers[module].base_layer, str(expert.folder))
    current = {module: layer_fingerprint(layers[module].base_layer) for module in expert.fingerprint}
    check_fingerprints(current, expert.fingerprint, str(expert.folder))


def expert_references(layers: Mapping[str, nn.Module]) -> dict[str, str]:
    """{expert folder: sha256} of every mixture among `layers`, for checkpoints to record."""
    references = {}
    for layer in layers.values():
        if isinstance(layer.adapter, LoraMixtureAdapter) and layer.config.expert_sha256:
            references.update(zip(layer.config.experts, layer.config.expert_sha256, strict=True))
    return references


def check_expert_references(
    layers: Mapping[str, nn.Module], recorded: Mapping[str, str], source: str
) -> None:
    """Refuse a checkpoint whose gates were trained over experts that have changed since."""
    current = expert_references(layers)
    for folder, sha256 in recorded.items():
        if current.get(folder) != sha256:
            raise AdapterCheckpointError(
                f"{source} was trained over expert adapter {folder} with sha256 {sha256[:16]}...; the model now "
                f"has {current.get(folder, 'no such expert')[:16]}... there; restore the expert or retrain the gate"
            )
