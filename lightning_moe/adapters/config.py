"""Adapter configurations: typed dataclasses that are both the YAML schema and the checkpoint record.

Each config names its `kind`, which makes a YAML mapping unambiguous (`adapter: {kind: moe, ...}`)
and lets `adapter_config.json` rebuild the same adapter later.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Literal

from .errors import AdapterConfigError

LoraInit = Literal["kaiming", "gaussian", "pissa"]
Backend = Literal["loop", "dense", "grouped"]
RouterGradient = Literal["prob", "straight_through"]


@dataclass
class LowRankConfig:
    """Fields every low-rank adapter shares (see `LoraConfig` for their meaning)."""

    rank: int = 8
    alpha: float = 16.0
    dropout: float = 0.0
    use_rslora: bool = False
    init: LoraInit = "kaiming"

    def __post_init__(self) -> None:
        if self.rank <= 0:
            raise AdapterConfigError(f"rank must be a positive integer, got rank={self.rank}")
        if not 0.0 <= self.dropout < 1.0:
            raise AdapterConfigError(f"dropout must be in [0, 1), got dropout={self.dropout}")

    @property
    def scaling(self) -> float:
        return self.alpha / (self.rank**0.5 if self.use_rslora else self.rank)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


@dataclass
class LoraConfig(LowRankConfig):
    """Plain LoRA: frozen W plus scaling * B @ A.

    Args:
        kind: Adapter kind tag, always "lora".
        rank: Rank r of the update.
        alpha: Scaling numerator: scaling = alpha / r (or alpha / sqrt(r) with rsLoRA).
        dropout: Dropout on the adapter input during training.
        use_rslora: Rank-stabilised scaling alpha / sqrt(r).
        init: "kaiming" (A kaiming-uniform, B = 0), "gaussian" (A ~ N(0, 1/r), B = 0) or
            "pissa" (A, B from the top-r singular vectors of W; the frozen W is not modified,
            the initial principal part is subtracted instead so the start equals the base model).
    """

    kind: Literal["lora"] = "lora"


@dataclass
class MoELoraConfig(LowRankConfig):
    """A mixture of LoRA experts behind a token-level top-k router (MoLE: top-1; MixLoRA: top-2).

    Args:
        kind: Adapter kind tag, always "moe".
        rank: Rank r of every expert.
        alpha: Scaling numerator, as in `LoraConfig`.
        dropout: Dropout on the expert input during training.
        use_rslora: Rank-stabilised scaling alpha / sqrt(r).
        init: Expert init: "kaiming" or "gaussian" A, B = 0 ("pissa" is not defined for experts).
        num_experts: Number of LoRA experts E (stacked as A: [E, r, in], B: [E, out, r]).
        top_k: Experts per token. With top_k > 1 the chosen probabilities are renormalised.
        router_gradient: For top-1 only: "prob" scales the expert output by its probability
            (the router learns from the task loss through that product); "straight_through"
            uses weight 1 in the forward pass and the probability's gradient in the backward.
        jitter_noise: Multiplicative uniform noise (1 +- eps) on the router input in training.
        backend: Expert compute path: "loop" (reference), "dense" or "grouped"; all agree.
    """

    kind: Literal["moe"] = "moe"
    num_experts: int = 4
    top_k: int = 1
    router_gradient: RouterGradient = "prob"
    jitter_noise: float = 0.0
    backend: Backend = "dense"

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.num_experts < 1:
            raise AdapterConfigError(f"num_experts must be >= 1, got num_experts={self.num_experts}")
        if not 1 <= self.top_k <= self.num_experts:
            raise AdapterConfigError(
                f"top_k must be between 1 and num_experts={self.num_experts}, got top_k={self.top_k}"
            )
        if self.init == "pissa":
            raise AdapterConfigError(
                "init='pissa' applies to plain LoRA; MoE experts use 'kaiming' or 'gaussian'"
            )
        if self.jitter_noise < 0:
            raise AdapterConfigError(f"jitter_noise must be >= 0, got jitter_noise={self.jitter_noise}")
        if self.router_gradient == "straight_through" and self.top_k > 1:
            raise AdapterConfigError(
                f"router_gradient='straight_through' is defined for top_k=1 only (top_k > 1 renormalises "
                f"the chosen probabilities), got top_k={self.top_k}"
            )


AdapterConfig = LoraConfig | MoELoraConfig

CONFIG_KINDS: dict[str, type[LowRankConfig]] = {"lora": LoraConfig, "moe": MoELoraConfig}


def config_from_dict(data: dict) -> AdapterConfig:
    """Rebuild a config from `to_dict()` output (as stored in adapter_config.json)."""
    kind = data.get("kind")
    if kind not in CONFIG_KINDS:
        raise AdapterConfigError(f"unknown adapter kind {kind!r}; expected one of {sorted(CONFIG_KINDS)}")
    cls = CONFIG_KINDS[kind]
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - known)
    if unknown:
        raise AdapterConfigError(f"adapter kind {kind!r} has no option(s) {unknown}; known: {sorted(known)}")
    return cls(**data)


@dataclass
class AdapterRule:
    """Which modules get which adapter.

    Args:
        targets: Module-name patterns. A plain pattern matches a module whose dotted name equals it
            or ends with "." + pattern (e.g. "mlp.up_proj"); with `regex` it is a full-match regex.
        adapter: The adapter each matched linear layer receives.
        regex: Treat `targets` as regular expressions matched against the full module name.
    """

    targets: list[str]
    adapter: AdapterConfig
    regex: bool = False

    def __post_init__(self) -> None:
        if not self.targets:
            raise AdapterConfigError("an adapter rule needs at least one target pattern, got targets=[]")

    def to_dict(self) -> dict:
        return {"targets": list(self.targets), "adapter": self.adapter.to_dict(), "regex": self.regex}

    @classmethod
    def from_dict(cls, data: dict) -> AdapterRule:
        return cls(
            targets=list(data["targets"]), adapter=config_from_dict(data["adapter"]), regex=data["regex"]
        )


LLAMA_MLP = ["mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"]
LLAMA_ATTENTION = ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj"]


def mole_rules(
    num_experts: int = 4,
    rank: int = 8,
    alpha: float = 16.0,
    mlp_targets: list[str] | None = None,
    router_gradient: RouterGradient = "prob",
    backend: Backend = "dense",
) -> list[AdapterRule]:
    """LLaVA-MoLE: top-1 LoRA experts on the MLP linears only."""
    moe = MoELoraConfig(
        rank=rank,
        alpha=alpha,
        num_experts=num_experts,
        top_k=1,
        router_gradient=router_gradient,
        backend=backend,
    )
    return [AdapterRule(targets=mlp_targets or list(LLAMA_MLP), adapter=moe)]


def mixlora_rules(
    num_experts: int = 8,
    top_k: int = 2,
    rank: int = 8,
    alpha: float = 16.0,
    mlp_targets: list[str] | None = None,
    attention_targets: list[str] | None = None,
    backend: Backend = "dense",
) -> list[AdapterRule]:
    """MixLoRA: top-k (k >= 2) LoRA experts on the FFN plus a plain LoRA on attention."""
    if top_k < 2:
        raise AdapterConfigError(f"MixLoRA routes each token to top_k >= 2 experts, got top_k={top_k}")
    moe = MoELoraConfig(rank=rank, alpha=alpha, num_experts=num_experts, top_k=top_k, backend=backend)
    return [
        AdapterRule(targets=mlp_targets or list(LLAMA_MLP), adapter=moe),
        AdapterRule(
            targets=attention_targets or list(LLAMA_ATTENTION), adapter=LoraConfig(rank=rank, alpha=alpha)
        ),
    ]
