"""kind `moe`: a mixture of LoRA experts behind a token-level top-k router (MoLE: top-1 on the
MLP; MixLoRA: top-2 on the FFN), the experts stored stacked so every backend serves them."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass
from typing import ClassVar, Literal

import torch
from torch import Tensor, nn

from .adapter_folder import check_fingerprints, layer_fingerprint
from .backends import Backend, expert_backend
from .base import Adapter, register_adapter
from .errors import AdapterCheckpointError, AdapterConfigError
from .lora import LowRankConfig, kaiming_uniform_rows_
from .lora_factors import PretrainedLora, check_factor_shapes, read_pretrained_lora
from .routing import BLOCKED_LOGIT, MODALITIES, SHARED, RouterGradient, TopKRouter

ModalityRouting = Literal["restrict", "bias"]


@dataclass
class MoEConfig(LowRankConfig):
    """A mixture of LoRA experts behind a token-level top-k router (MoLE: top-1; MixLoRA: top-2).

    Args:
        rank: Rank r of every expert.
        alpha: Scaling numerator, as in `LoraConfig`.
        dropout: Dropout on the expert input during training.
        use_rslora: Rank-stabilised scaling alpha / sqrt(r).
        init: Expert init, B = 0: "kaiming" or "gaussian" A, or "eva": expert e's A is the e-th
            slice of the top num_experts * rank directions of the layer's inputs (distinct
            starting subspaces, from the first training batches; see `data_init`).
        num_experts: Number of LoRA experts E (stacked as A: [E, r, in], B: [E, out, r]).
        top_k: Experts per token. With top_k > 1 the chosen probabilities are renormalised.
        router_gradient: For top-1 only: "prob" scales the expert output by its probability
            (the router learns from the task loss through that product); "straight_through"
            uses weight 1 in the forward pass and the probability's gradient in the backward.
        jitter_noise: Multiplicative uniform noise (1 +- eps) on the router input in training.
        backend: Expert compute path: "loop" (reference), "dense" or "grouped", all equal in
            outputs and gradients; "auto" picks the fastest measured for the device, dtype and
            expert count (see `backends.auto_backend`).
        router_norm: Divide the router's input by its RMS (see `TopKRouter`).
        router_init_std: Initial gate weights ~ N(0, std²) (None: nn.Linear's init).
        expert_modalities: Each expert's modality ("text", "image", "audio") or "shared". A token
            may use the experts of its own modality and the shared ones (a modality with neither
            uses all). Tokens' modalities come from the task (`RoutingCollector.modalities`);
            unmarked tokens are text.
        modality_routing: "restrict": a token's router chooses only among the experts it may
            use; "bias": it chooses among all, with `modality_bias` added to those logits.
        modality_bias: The logit bonus of a token's own and shared experts under "bias".
        expert_init: One LoRA adapter folder (or null) per expert: expert e starts from that
            LoRA's factors at this layer (upcycling, e.g. Uni-MoE's modality experts). The LoRA's
            rank must not exceed `rank`; its scaling is folded in.
    """

    kind: ClassVar[str] = "moe"
    num_experts: int = 4
    top_k: int = 1
    router_gradient: RouterGradient = "prob"
    jitter_noise: float = 0.0
    backend: Backend = "auto"
    router_norm: bool = False
    router_init_std: float | None = None
    expert_modalities: list[str] | None = None
    modality_routing: ModalityRouting = "restrict"
    modality_bias: float = 2.0
    expert_init: list[str | None] | None = None

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.num_experts < 1:
            raise AdapterConfigError(f"num_experts must be >= 1, got num_experts={self.num_experts}")
        if not 1 <= self.top_k <= self.num_experts:
            raise AdapterConfigError(
                f"top_k must be between 1 and num_experts={self.num_experts}, got top_k={self.top_k}"
            )
        self.allow_inits("MoE experts", "kaiming", "gaussian", "eva")
        if self.jitter_noise < 0:
            raise AdapterConfigError(f"jitter_noise must be >= 0, got jitter_noise={self.jitter_noise}")
        if self.router_gradient == "straight_through" and self.top_k > 1:
            raise AdapterConfigError(
                f"router_gradient='straight_through' is defined for top_k=1 only (top_k > 1 renormalises "
                f"the chosen probabilities), got top_k={self.top_k}"
            )
        if self.router_init_std is not None and self.router_init_std <= 0:
            raise AdapterConfigError(
                f"router_init_std must be > 0, got router_init_std={self.router_init_std}"
            )
        for option in ("expert_modalities", "expert_init"):
            value = getattr(self, option)
            if value is not None and len(value) != self.num_experts:
                raise AdapterConfigError(
                    f"{option} needs one entry per expert (num_experts={self.num_experts}), got {value}"
                )
        if self.expert_modalities is not None:
            self.allowed_experts()  # checks the names and that every modality has top_k experts
        if self.expert_init is not None and self.init == "eva":
            raise AdapterConfigError(
                "expert_init sets the experts' start, so it cannot be combined with init='eva'"
            )

    def for_saved_weights(self) -> MoEConfig:
        return dataclasses.replace(self, expert_init=None) if self.expert_init else self

    def allowed_experts(self) -> list[list[bool]]:
        """Per modality (MODALITIES order): which experts its tokens may use."""
        names = self.expert_modalities or [SHARED] * self.num_experts
        unknown = sorted(set(names) - {*MODALITIES, SHARED})
        if unknown:
            raise AdapterConfigError(
                f"expert_modalities: unknown modality {unknown[0]!r}; use {list(MODALITIES)} or {SHARED!r}"
            )
        allowed = []
        for modality in MODALITIES:
            usable = [name in (modality, SHARED) for name in names]
            usable = usable if any(usable) else [True] * len(names)
            if self.modality_routing == "restrict" and sum(usable) < self.top_k:
                raise AdapterConfigError(
                    f"expert_modalities {names}: {modality} tokens may use {sum(usable)} expert(s), "
                    f"fewer than top_k={self.top_k}"
                )
            allowed.append(usable)
        return allowed


class ExpertBank(nn.Module):
    """E LoRA experts stored stacked (A: [E, r, in], B: [E, out, r]) so one set of weights
    serves every compute backend and shards as one unit."""

    def __init__(
        self,
        num_experts: int,
        in_features: int,
        out_features: int,
        rank: int,
        scaling: float,
        dropout: float = 0.0,
        init: str = "kaiming",
        device: torch.device | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        self.scaling = scaling
        self.lora_A = nn.Parameter(torch.empty(num_experts, rank, in_features, device=device, dtype=dtype))
        self.lora_B = nn.Parameter(torch.zeros(num_experts, out_features, rank, device=device, dtype=dtype))
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        with torch.no_grad():
            if init == "gaussian":
                nn.init.normal_(self.lora_A, std=1.0 / rank)
            else:
                for expert_A in self.lora_A:  # each expert gets nn.Linear's init for its own [r, in]
                    kaiming_uniform_rows_(expert_A)

    @property
    def num_experts(self) -> int:
        return self.lora_A.shape[0]

    def forward(
        self, x: Tensor, indices: Tensor, weights: Tensor, backend: str = "auto", frozen: Tensor | None = None
    ) -> Tensor:
        """x: [N, in]; indices, weights: [N, k] -> [N, out]. Experts marked in `frozen` ([E] bool)
        act as usual but get no gradient (their weights enter detached)."""
        x = self.dropout(x.to(self.lora_A.dtype))
        weights = (weights * self.scaling).to(x.dtype)
        A, B = self.lora_A, self.lora_B
        if frozen is not None and bool(frozen.any()):
            mask = frozen.view(-1, 1, 1)
            A, B = torch.where(mask, A.detach(), A), torch.where(mask, B.detach(), B)
        compute = expert_backend(backend, x, self.num_experts, indices.shape[-1])
        return compute(x, A, B, indices, weights)


@register_adapter
class MoEAdapter(Adapter):
    """Router + expert bank; the delta of one adapted linear layer.

    The router's decisions go to the collector `inject` binds (when it is capturing) instead of
    changing what this module returns.
    """

    config_class = MoEConfig
    routed = True

    def __init__(self, base_layer: nn.Linear, config: MoEConfig) -> None:
        super().__init__(base_layer, config)
        factory = {"device": base_layer.weight.device, "dtype": base_layer.weight.dtype}
        self.router = self.build_router(base_layer, config, factory)
        self.experts = ExpertBank(
            config.num_experts,
            base_layer.in_features,
            base_layer.out_features,
            config.rank,
            config.scaling,
            config.dropout,
            config.init,
            **factory,
        )
        self.backend = config.backend
        self.register_buffer("modality_logit_bias", self.modality_table(config), persistent=False)

    @staticmethod
    def modality_table(config: MoEConfig) -> Tensor | None:
        """[modalities, E]: what each modality's tokens add to each expert's logit (None: nothing)."""
        if config.expert_modalities is None:
            return None
        allowed = torch.tensor(config.allowed_experts())
        if config.modality_routing == "restrict":
            return torch.where(allowed, 0.0, BLOCKED_LOGIT)
        return allowed.float() * config.modality_bias

    def router_parameters(self) -> list[nn.Parameter]:
        return list(self.router.parameters())

    @classmethod
    def prepare(cls, layers: Mapping[str, nn.Module]) -> None:
        upcycle_experts(layers)

    @torch.no_grad()
    def start_expert_from(self, expert: int, lora_A: Tensor, lora_B: Tensor) -> None:
        """Expert `expert` computes the LoRA (A [r', in], B [out, r'] with its scaling folded in)."""
        bank, rank = self.experts, lora_A.shape[0]
        bank.lora_A[expert].zero_()[:rank] = lora_A
        bank.lora_B[expert].zero_()[:, :rank] = lora_B / bank.scaling

    def input_projection(self) -> Tensor:
        """The experts' stacked A ([E, r, in]) that EVA fills, expert by expert."""
        return self.experts.lora_A

    def low_rank_factors(self) -> tuple[nn.Parameter, nn.Parameter, float]:
        """The stacked (A, B, scaling): each expert is its own pair for LoRA-Pro and ALLoRA."""
        return self.experts.lora_A, self.experts.lora_B, self.experts.scaling

    def build_router(self, base_layer: nn.Linear, config: MoEConfig, factory: dict) -> nn.Module:
        return TopKRouter(base_layer.in_features, **router_arguments(config), **factory)

    def route(self, flat: Tensor, lead_shape: tuple[int, ...]) -> tuple[Tensor, Tensor, Tensor]:
        bias = None
        if self.modality_logit_bias is not None:
            marked = self.collector.marked if self.collector is not None else None
            modality = marked.of(lead_shape).to(flat.device) if marked is not None else None
            bias = self.modality_logit_bias[0 if modality is None else modality].expand(len(flat), -1)
        return self.router(flat, bias)

    def frozen_mask(self) -> Tensor | None:
        """Experts that must not train (none here; MoE-Adapters freezes some)."""
        return None

    def forward(self, x: Tensor) -> Tensor:
        lead_shape = x.shape[:-1]
        flat = x.reshape(-1, x.shape[-1])
        indices, weights, logits = self.route(flat, lead_shape)
        self.report_routing(lead_shape, logits, indices)
        delta = self.experts(flat, indices, weights, self.backend, self.frozen_mask())
        return delta.view(*lead_shape, delta.shape[-1])


def router_arguments(config: MoEConfig) -> dict:
    """The `TopKRouter` settings a MoE config holds."""
    return {
        "num_experts": config.num_experts,
        "top_k": config.top_k,
        "gradient": config.router_gradient,
        "jitter_noise": config.jitter_noise,
        "input_norm": config.router_norm,
        "init_std": config.router_init_std,
    }


def upcycle_experts(layers: Mapping[str, nn.Module]) -> None:
    """Start the experts of every MoE layer with `expert_init` from those LoRA folders (each read
    once). A folder made for another base (layer shapes or fingerprint) or with a larger rank than
    the experts' is refused, naming it; a layer the folder does not adapt keeps its fresh expert."""
    read: dict[str, PretrainedLora] = {}
    for name, layer in layers.items():
        folders = getattr(layer.config, "expert_init", None)
        if not isinstance(layer.adapter, MoEAdapter) or not folders:
            continue
        for expert, folder in enumerate(folders):
            if folder is None:
                continue
            if folder not in read:
                read[folder] = read_pretrained_lora(folder)
            lora = read[folder]
            if name not in lora.factors:
                continue
            lora_A, lora_B = lora.factors[name]
            check_factor_shapes(name, lora_A, lora_B, layer.base_layer, folder)
            if lora_A.shape[0] > layer.config.rank:
                raise AdapterCheckpointError(
                    f"expert_init {folder}: its LoRA at {name!r} has rank {lora_A.shape[0]}, more than the "
                    f"experts' rank={layer.config.rank}"
                )
            if name in lora.fingerprint:
                check_fingerprints(
                    {name: layer_fingerprint(layer.base_layer)}, {name: lora.fingerprint[name]}, folder
                )
            layer.adapter.start_expert_from(expert, lora_A, lora_B)
