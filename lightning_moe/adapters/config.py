"""Adapter configurations: typed dataclasses that are both the YAML schema and the checkpoint record.

Each config names its `kind`, which makes a YAML mapping unambiguous (`adapter: {kind: moe, ...}`)
and lets `adapter_config.json` rebuild the same adapter later.
"""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass, field
from typing import Literal

from .errors import AdapterConfigError

LoraInit = Literal["kaiming", "gaussian", "pissa"]
Backend = Literal["auto", "loop", "dense", "grouped"]
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
        backend: Expert compute path: "loop" (reference), "dense" or "grouped", all equal in
            outputs and gradients; "auto" picks the fastest measured for the device, dtype and
            expert count (see `backends.auto_backend`).
    """

    kind: Literal["moe"] = "moe"
    num_experts: int = 4
    top_k: int = 1
    router_gradient: RouterGradient = "prob"
    jitter_noise: float = 0.0
    backend: Backend = "auto"

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


@dataclass
class TaskMoEConfig(MoELoraConfig):
    """MoE-Adapters (Yu et al., 2024): LoRA experts shared by all tasks, one router per task; after
    each task the experts its router used most are frozen (see `adapters.task_experts`).

    Args:
        kind: Adapter kind tag, always "task_moe".
        rank, alpha, dropout, use_rslora, init, num_experts, top_k, router_gradient,
            jitter_noise, backend: As in MoELoraConfig.
        num_tasks: Routers: tasks the layer can learn.
        freeze_per_task: Experts frozen after each task (the most used ones not frozen yet).
    """

    kind: Literal["task_moe"] = "task_moe"
    num_tasks: int = 10
    freeze_per_task: int = 1

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.num_tasks < 1 or not 0 <= self.freeze_per_task <= self.num_experts:
            raise AdapterConfigError(
                f"need num_tasks >= 1 and 0 <= freeze_per_task <= num_experts={self.num_experts}, got "
                f"num_tasks={self.num_tasks}, freeze_per_task={self.freeze_per_task}"
            )


@dataclass
class LoraMixtureConfig:
    """Fields shared by X-LoRA and MeteoRA: K pre-trained LoRAs, frozen and packed, mixed per token.

    Ranks, alphas and target sets come from the expert folders; see `mixture.py` for the packing.
    """

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

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


@dataclass
class XLoraConfig(LoraMixtureConfig):
    """X-LoRA: frozen pre-trained LoRAs mixed per token by a small gating classifier, in ONE forward
    pass (each adapted layer's gate reads that layer's own input; see mixture.py).

    Args:
        kind: Adapter kind tag, always "xlora".
        experts: Expert adapter folders, ours or PEFT (`adapter_config.json` +
            `adapter_model.safetensors`), in gate order.
        expert_sha256: Content hashes of the expert folders, filled in when they are first loaded
            and checked on every later load (a changed expert behind a saved gate is refused).
        top_k: Keep only the k largest mixing weights per token (renormalised); None mixes all.
        temperature: Softmax temperature of the gate.
        gate_hidden: Width of the gate's hidden layer (0: a single linear layer).
        gate_dropout: Dropout on the gate's hidden layer during training.
        fixed_weights: Instead of a trained gate, the same weights for every token (e.g. a uniform
            [0.25, 0.25, 0.25, 0.25] is the merged average; a one-hot picks one expert).
        expert_tasks: The task (data `domain`) each expert was trained on, for the supervised gate
            loss (`router_loss.label_coef`).
        backend: Expert compute path ("auto", "loop", "dense" or "grouped"); all agree.
    """

    kind: Literal["xlora"] = "xlora"


@dataclass
class MeteoraConfig(LoraMixtureConfig):
    """MeteoRA: a linear gate per adapted layer picks the top-k of the packed frozen LoRAs per token
    (weights renormalised over the chosen k), trained with the LM loss and optionally a supervised
    loss towards each sample's task (`expert_tasks` + `router_loss.label_coef`).

    Args:
        kind: Adapter kind tag, always "meteora".
        experts: Expert adapter folders, ours or PEFT, in gate order.
        expert_sha256: Content hashes of the expert folders (filled in and checked, see XLoraConfig).
        top_k: Experts per token.
        temperature: Softmax temperature of the gate.
        gate_hidden: Width of a hidden gate layer (0: linear, as in MeteoRA).
        gate_dropout: Dropout on the gate's hidden layer during training.
        fixed_weights: Instead of a trained gate, the same weights for every token.
        expert_tasks: The task (data `domain`) each expert was trained on.
        backend: Expert compute path ("auto", "loop", "dense" or "grouped"); all agree.
    """

    kind: Literal["meteora"] = "meteora"
    top_k: int | None = 2


@dataclass
class RankGatedLoraConfig(LowRankConfig):
    """CoDyRA / Dynamic Rank-Selective LoRA (Lu et al., 2025): LoRA whose r ranks each carry a
    learnable gate, scaling * B @ diag(g) @ A. Training shrinks the gates with a proximal
    soft-threshold after every optimizer step (`soft_threshold_rank_gates`), so unneeded ranks
    reach exactly zero; at a task end `merge_rank_gated_updates` merges the surviving ranks into
    the layer's frozen part and starts fresh ranks for the next task.

    Args:
        kind: Adapter kind tag, always "codyra".
        rank, alpha, dropout, use_rslora, init: As in LoraConfig ("pissa" is not supported).
        gate_init: Starting value of every rank's gate.
        num_tasks: Capacity: tasks whose merged ranks the layer can hold.
    """

    kind: Literal["codyra"] = "codyra"
    gate_init: float = 1.0
    num_tasks: int = 10

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.num_tasks < 1:
            raise AdapterConfigError(f"num_tasks must be >= 1, got num_tasks={self.num_tasks}")
        if self.init == "pissa":
            raise AdapterConfigError(
                "init='pissa' applies to plain LoRA; rank-gated LoRA uses 'kaiming' or 'gaussian'"
            )


@dataclass
class RankExpertsConfig(LowRankConfig):
    """MoRA, "Little by Little" (sparse mixture of rank-1 experts): every rank-1 component
    b_i a_i^T is an expert that scores itself by the cosine of a_i and the input (no router);
    each token uses the `top_k` best-scoring atoms (softmax over scores / `temperature`,
    renormalised over the chosen), at evaluation every atom whose probability reaches
    `eval_threshold`. Each task trains `rank` new atoms while earlier tasks' atoms stay frozen
    (`freeze_task_atoms`); atoms used by fewer than `prune_below` of the tokens during their task
    are pruned when frozen.

    Args:
        kind: Adapter kind tag, always "mora".
        rank: New atoms per task.
        alpha, dropout, use_rslora, init: As in LoraConfig ("pissa" is not supported);
            scaling = alpha / rank.
        num_tasks: Capacity: tasks whose atoms the layer can hold.
        top_k: Atoms per token in training (the activation budget).
        temperature: Softmax temperature of the atoms' scores.
        eval_threshold: Evaluation keeps atoms with probability >= this (None: top-k as in training).
        prune_below: At freezing, atoms chosen by fewer than this share of tokens are pruned.
    """

    kind: Literal["mora"] = "mora"
    num_tasks: int = 10
    top_k: int = 2
    temperature: float = 1.0
    eval_threshold: float | None = None
    prune_below: float = 0.0

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.init == "pissa":
            raise AdapterConfigError(
                "init='pissa' applies to plain LoRA; rank experts use 'kaiming' or 'gaussian'"
            )
        if self.num_tasks < 1 or not 1 <= self.top_k <= self.rank * self.num_tasks:
            raise AdapterConfigError(
                f"need num_tasks >= 1 and 1 <= top_k <= rank * num_tasks, got num_tasks={self.num_tasks}, "
                f"top_k={self.top_k}, rank={self.rank}"
            )
        if self.temperature <= 0 or not 0.0 <= self.prune_below < 1.0:
            raise AdapterConfigError(
                f"temperature must be > 0 and prune_below in [0, 1), got {self.temperature} and {self.prune_below}"
            )


AdapterConfig = (
    LoraConfig
    | MoELoraConfig
    | TaskMoEConfig
    | XLoraConfig
    | MeteoraConfig
    | RankGatedLoraConfig
    | RankExpertsConfig
)

CONFIG_KINDS: dict[str, type] = {
    "lora": LoraConfig,
    "moe": MoELoraConfig,
    "task_moe": TaskMoEConfig,
    "xlora": XLoraConfig,
    "meteora": MeteoraConfig,
    "codyra": RankGatedLoraConfig,
    "mora": RankExpertsConfig,
}


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


def target_matches(name: str, pattern: str, regex: bool) -> bool:
    """A plain pattern matches the dotted name itself or a suffix after a dot; a regex must match fully."""
    if regex:
        return re.fullmatch(pattern, name) is not None
    return name == pattern or name.endswith("." + pattern)


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

    def matches(self, name: str) -> bool:
        return any(target_matches(name, pattern, self.regex) for pattern in self.targets)

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
    backend: Backend = "auto",
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
    backend: Backend = "auto",
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
