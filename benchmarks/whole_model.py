"""Shared by the whole-model benchmarks: SmolLM2-135M's shape with random weights, and the timed
training and inference steps."""

from __future__ import annotations

from collections.abc import Callable

import torch
from timing import measure, ratio_table, tokens_per_second
from torch import nn
from transformers import LlamaConfig, LlamaForCausalLM

SMOLLM2_135M = LlamaConfig(
    vocab_size=49152,
    hidden_size=576,
    intermediate_size=1536,
    num_hidden_layers=30,
    num_attention_heads=9,
    num_key_value_heads=3,
    max_position_embeddings=2048,
    tie_word_embeddings=True,
    use_cache=False,  # peft's XLoraModel refuses a KV cache
)
LINEARS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def base_model() -> nn.Module:
    torch.manual_seed(0)  # every variant wraps identical base weights
    return LlamaForCausalLM(SMOLLM2_135M)


def train_step(
    model: nn.Module, ids: torch.Tensor, trainable: list[torch.Tensor] | None = None
) -> Callable[[], None]:
    """Forward + backward of the LM loss; `trainable` for adapters that hide their parameters
    from `model.parameters()`."""
    trainable = trainable if trainable is not None else [p for p in model.parameters() if p.requires_grad]
    if not trainable:  # the floor: backward through every activation, no weight gradients
        model.enable_input_require_grads()

    def step() -> None:
        model(input_ids=ids, labels=ids).loss.backward()
        for parameter in trainable:
            parameter.grad = None

    return step


def inference_step(model: nn.Module, ids: torch.Tensor) -> Callable[[], None]:
    def step() -> None:
        with torch.no_grad():
            model(input_ids=ids)

    return step


def time_models(
    models: dict[str, nn.Module],
    batch: int,
    tokens: int,
    rounds: int,
    warmup: int,
    trainable: dict[str, list[torch.Tensor]] | None = None,
) -> tuple[dict[str, list[float]], dict[str, list[float]]]:
    """Interleaved training-step and inference times (ms) of every model on the same random ids;
    "frozen model" is timed in eval mode as the floor."""
    trainable = trainable or {}
    ids = torch.randint(
        0, SMOLLM2_135M.vocab_size, (batch, tokens), generator=torch.Generator().manual_seed(0)
    )
    for name, model in models.items():
        model.train(name != "frozen model")
    training = measure({n: train_step(m, ids, trainable.get(n)) for n, m in models.items()}, rounds, warmup)
    for model in models.values():
        model.eval()
    inference = measure({n: inference_step(m, ids) for n, m in models.items()}, rounds, warmup)
    return training, inference


def step_tables(
    training: dict[str, list[float]],
    inference: dict[str, list[float]],
    reference: str,
    tokens: int | None = None,
) -> list[str]:
    """Training and inference tables; with `tokens` (per call) also tokens per second."""

    def throughput(times: dict[str, list[float]]) -> dict[str, dict[str, str]]:
        return {"tokens/s": tokens_per_second(times, tokens)} if tokens else {}

    return [
        "## Training step (forward + backward)",
        "",
        *ratio_table(training, reference, decimals=0, columns=throughput(training)),
        "",
        "## Inference (one forward pass, no gradients)",
        "",
        *ratio_table(inference, reference, decimals=0, columns=throughput(inference)),
    ]
