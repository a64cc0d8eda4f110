"""Rule presets of the published mixtures: MoLE and MixLoRA on a Llama-style model."""

from __future__ import annotations

from .backends import Backend
from .errors import AdapterConfigError
from .lora import LoraConfig
from .moe import MoEConfig
from .routing import RouterGradient
from .rules import AdapterRule

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
    moe = MoEConfig(
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
    moe = MoEConfig(rank=rank, alpha=alpha, num_experts=num_experts, top_k=top_k, backend=backend)
    return [
        AdapterRule(targets=mlp_targets or list(LLAMA_MLP), adapter=moe),
        AdapterRule(
            targets=attention_targets or list(LLAMA_ATTENTION), adapter=LoraConfig(rank=rank, alpha=alpha)
        ),
    ]
