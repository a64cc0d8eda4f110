"""A frozen base stored in 4 bits (QLoRA's NF4), and LQ-LoRA's split of W into Q + L.

NF4 (Dettmers et al. 2023) stores each weight as one of 16 NormalFloat levels times the absmax of
its block of `block_size` weights; the block scales are themselves quantised to int8 in groups of
`scaler_block_size` (the double quantisation). The tensor is torchao's `NF4Tensor`: it runs
on CPU with our pins, `F.linear` dequantises per call and its backward saves only the 4-bit
weight. bitsandbytes' CPU backend measured faster (docs/memory.md), but its weight is a uint8
tensor of another shape, while torchao's keeps the float dtype and shape that every adapter kind
and the model code read. torchao is imported only when a base is quantised.

LQ-LoRA (Guo et al. 2024) splits W into a quantised Q plus a rank-r L = B0 @ A0 by alternating
L <- SVD_r(W - Q) and Q <- NF4(W - L); the LoRA then starts at L, so Q + L approximates W better
than NF4(W) alone. With column weights d (from calibration inputs, `lq_weighting: activations`)
the SVD step minimises ||(W - Q - L) diag(d)|| instead. The last step quantises W - L, so Q is
NF4(W - B0 A0) and the adapter folder needs only A0 and B0 to rebuild the same Q.
"""

from __future__ import annotations

import logging
import math
import re
from dataclasses import dataclass, field
from typing import ClassVar, Literal

import torch
from torch import Tensor, nn

from .errors import AdapterConfigError

QUANTIZABLE_DTYPES = (torch.float32, torch.bfloat16, torch.float64)


def _drop_enum_registration_warnings(record: logging.LogRecord) -> bool:
    # torchao 0.18 registers its enums with torch's pytree, which warns once per enum
    return "is an Enum subclass" not in record.getMessage()


logging.getLogger("torch.utils._pytree").addFilter(_drop_enum_registration_warnings)


@dataclass
class QuantizeConfig:
    """How the frozen base is stored.

    Args:
        scheme: "nf4": 4-bit NormalFloat with block-wise absmax scales.
        block_size: Weights per absmax scale (QLoRA: 64).
        scaler_block_size: Scales per int8 group of the double quantisation, at most; a layer
            whose block count it does not divide takes the largest power of two that does (e.g.
            SmolLM2's 576x192 projections have 1728 blocks: 64).
        skip: Regular expressions of module names kept in full precision (the output head by
            default); a linear whose weight is tied to an embedding is kept too, unless
            `embeddings` quantises both.
        embeddings: Also store the input embeddings in NF4 (a lookup dequantises only its rows);
            an output head tied to them computes with the same 4-bit table. For small models,
            whose embedding table is a large share of the base (SmolLM2-135M: 21 %).
    """

    scheme: Literal["nf4"] = "nf4"
    block_size: int = 64
    scaler_block_size: int = 256
    skip: list[str] = field(default_factory=lambda: [r"(^|\.)lm_head$"])
    embeddings: bool = False

    schemes: ClassVar[tuple[str, ...]] = ("nf4",)

    def __post_init__(self) -> None:
        if self.scheme not in self.schemes:
            raise AdapterConfigError(f"quantize scheme must be one of {self.schemes}, got {self.scheme!r}")
        for name in ("block_size", "scaler_block_size"):
            value = getattr(self, name)
            if value < 1 or value & (value - 1):
                raise AdapterConfigError(f"quantize {name} must be a power of two, got {name}={value}")


class QuantizedLinear(nn.Linear):
    """An nn.Linear whose frozen weight is an NF4Tensor (model code and `inject` see a linear).

    `offset_A`, `offset_B` (LQ-LoRA only) are the low-rank part taken out before quantising: the
    weight is NF4(W - offset_B @ offset_A). `quantization` describes the stored base for the
    adapter fingerprint; `relative_error` is ||W - dequantised - offset|| / ||W||.
    """

    def __init__(
        self, linear: nn.Linear, config: QuantizeConfig, offset: tuple[Tensor, Tensor] | None = None
    ):
        nn.Module.__init__(self)
        self.train(linear.training)
        self.in_features, self.out_features = linear.in_features, linear.out_features
        weight = linear.weight.detach()
        target = weight if offset is None else weight - (offset[1] @ offset[0]).to(weight.dtype)
        scaler_block = scaler_block_size(weight.numel(), config)
        self.weight = nn.Parameter(nf4(target, config.block_size, scaler_block), requires_grad=False)
        self.bias = None if linear.bias is None else nn.Parameter(linear.bias.detach(), requires_grad=False)
        self.quantization = {
            "scheme": config.scheme,
            "block_size": config.block_size,
            "scaler_block_size": scaler_block,
            "low_rank": 0 if offset is None else int(offset[0].shape[0]),
            "embeddings": config.embeddings,  # the rest of the base the adapter was trained with
        }
        if offset is not None:
            self.register_buffer("offset_A", offset[0].to(weight.dtype).contiguous())
            self.register_buffer("offset_B", offset[1].to(weight.dtype).contiguous())
        approximation = self.dequantized_weight() + (0 if offset is None else self.offset())
        self.relative_error = float((weight - approximation).norm() / weight.norm().clamp_min(1e-30))

    def dequantized_weight(self) -> Tensor:
        return self.weight.get_original_weight()

    def offset(self) -> Tensor | None:
        """LQ-LoRA's L = offset_B @ offset_A, or None."""
        return self.offset_B @ self.offset_A if self.quantization["low_rank"] else None

    def stored_bytes(self) -> int:
        return stored_bytes(self)

    def extra_repr(self) -> str:
        q = self.quantization
        low_rank = f", low_rank={q['low_rank']}" if q["low_rank"] else ""
        return f"{self.in_features}, {self.out_features}, {q['scheme']}, block={q['block_size']}{low_rank}"


def stored_bytes(module: nn.Module) -> int:
    """Bytes of a quantised module as stored: its NF4 weight's codes, int8 scales and their
    factors, plus its other tensors (bias, LQ-LoRA offset)."""
    inner, _ = module.weight.__tensor_flatten__()
    tensors = [getattr(module.weight, name) for name in inner]
    tensors += [t for name, t in [*module.named_parameters(), *module.named_buffers()] if name != "weight"]
    return sum(t.numel() * t.element_size() for t in tensors)


def nf4(weight: Tensor, block_size: int, scaler_block: int) -> Tensor:
    from torchao.quantization.quantize_.workflows.nf4.nf4_tensor import to_nf4

    return to_nf4(weight.contiguous(), block_size=block_size, scaler_block_size=scaler_block)


class QuantizedEmbedding(nn.Embedding):
    """An nn.Embedding whose frozen table is an NF4Tensor; a lookup dequantises only its rows."""

    def __init__(self, embedding: nn.Embedding, config: QuantizeConfig) -> None:
        nn.Module.__init__(self)
        self.train(embedding.training)
        self.num_embeddings, self.embedding_dim = embedding.num_embeddings, embedding.embedding_dim
        self.padding_idx, self.max_norm, self.sparse = embedding.padding_idx, None, False
        self.norm_type, self.scale_grad_by_freq = embedding.norm_type, embedding.scale_grad_by_freq
        if self.embedding_dim % config.block_size:
            raise AdapterConfigError(
                f"quantize embeddings: block_size={config.block_size} does not divide the embedding width {self.embedding_dim}"
            )
        table = embedding.weight.detach()
        self.weight = nn.Parameter(
            nf4(table, config.block_size, scaler_block_size(table.numel(), config)), requires_grad=False
        )

    def forward(self, ids: Tensor) -> Tensor:
        return dequantized_rows(self.weight, ids)


def dequantized_rows(weight: Tensor, rows: Tensor) -> Tensor:
    """weight.get_original_weight()[rows] of a 2-D NF4Tensor, decoding only those rows: two codes
    per byte (high nibble first) looked up in the 16 NF4 levels, times each block's scale."""
    out_features, width = weight.shape
    scales = weight.dequantize_scalers(
        weight.quantized_scalers, weight.quantization_factor, weight.scaler_block_size
    )
    packed = weight.quantized_data.view(out_features, width // 2)[rows]
    codes = torch.stack([packed >> 4, packed & 0b1111], dim=-1).flatten(-2).long()
    block_scales = scales.view(out_features, width // weight.block_size)[rows]
    return (weight.nf4[codes] * block_scales.repeat_interleave(weight.block_size, dim=-1)).to(weight.dtype)


def scaler_block_size(numel: int, config: QuantizeConfig, name: str = "a layer") -> int:
    if numel % config.block_size:
        raise AdapterConfigError(
            f"quantize block_size={config.block_size} does not divide the weight of {name} ({numel} values)"
        )
    blocks = numel // config.block_size
    return math.gcd(blocks, config.scaler_block_size)  # both powers of two up to the block count's


def dequantized(module: nn.Module) -> Tensor:
    """The weight a (possibly quantised) linear computes with, as a plain tensor."""
    return module.dequantized_weight() if isinstance(module, QuantizedLinear) else module.weight


def quantizable_linears(model: nn.Module, config: QuantizeConfig) -> dict[str, nn.Linear]:
    """Every nn.Linear of `model` that `config` quantises: not skipped, not tied to another module."""
    owners: dict[int, int] = {}
    for module in model.modules():
        for parameter in module.parameters(recurse=False):
            owners[id(parameter)] = owners.get(id(parameter), 0) + 1
    return {
        name: module
        for name, module in model.named_modules()
        if type(module) is nn.Linear
        and owners[id(module.weight)] == 1
        and not any(re.search(pattern, name) for pattern in config.skip)
    }


def quantize_base(
    model: nn.Module, config: QuantizeConfig, offsets: dict[str, tuple[Tensor, Tensor]] | None = None
) -> dict[str, QuantizedLinear]:
    """Replace the linears `config` quantises by `QuantizedLinear`s, in place (before adapters
    attach); `offsets[name] = (A0, B0)` is LQ-LoRA's low-rank part of that layer."""
    offsets = offsets or {}
    linears = quantizable_linears(model, config)
    unknown = sorted(set(offsets) - set(linears))
    if unknown:
        raise AdapterConfigError(f"a low-rank offset names {unknown[0]!r}, which is not a quantised linear")
    for name, linear in linears.items():
        if linear.weight.dtype not in QUANTIZABLE_DTYPES:
            raise AdapterConfigError(
                f"quantize {config.scheme} takes a float32 or bfloat16 base (float64 in tests); "
                f"{name!r} is {str(linear.weight.dtype).removeprefix('torch.')}"
            )
        scaler_block_size(linear.weight.numel(), config, repr(name))  # all are checked before any changes
    quantized = {name: QuantizedLinear(linear, config, offsets.get(name)) for name, linear in linears.items()}
    if config.embeddings:
        quantize_embeddings(model, config)
    for name, layer in quantized.items():
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent), child, layer)
    return quantized


def quantize_embeddings(model: nn.Module, config: QuantizeConfig) -> None:
    """Every nn.Embedding as a QuantizedEmbedding; a linear tied to one takes its 4-bit table."""
    for name, embedding in list(model.named_modules()):
        if type(embedding) is not nn.Embedding:
            continue
        tied = [m for m in model.modules() if isinstance(m, nn.Linear) and m.weight is embedding.weight]
        quantized = QuantizedEmbedding(embedding, config)
        for linear in tied:  # F.linear on the NF4 table: dequantised per call, like any 4-bit linear
            linear.weight = quantized.weight
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent) if parent else model, child, quantized)


def quantized_layers(model: nn.Module) -> dict[str, QuantizedLinear]:
    return {name: module for name, module in model.named_modules() if isinstance(module, QuantizedLinear)}


def base_bytes(model: nn.Module) -> int:
    """Bytes of the base model's tensors (quantised weights as stored), adapters (modules named
    `adapter`, as `AdaptedLinear` names them) excluded."""
    layers = [*quantized_layers(model).values()]
    layers += [m for m in model.modules() if isinstance(m, QuantizedEmbedding)]
    total = sum(stored_bytes(layer) for layer in layers)
    seen = {id(t) for layer in layers for t in [*layer.parameters(), *layer.buffers()]}
    named = [*model.named_parameters(), *model.named_buffers()]
    for name, tensor in named:
        if id(tensor) not in seen and ".adapter." not in f".{name}":
            seen.add(id(tensor))
            total += tensor.numel() * tensor.element_size()
    return total


# --- LQ-LoRA --------------------------------------------------------------------------------------
@torch.no_grad()
def lq_decompose(
    weight: Tensor,
    rank: int,
    config: QuantizeConfig,
    iterations: int,
    column_weights: Tensor | None = None,
) -> tuple[Tensor, Tensor, list[float]]:
    """LQ-LoRA's (A0 [r, in], B0 [out, r]) with W ~ NF4(W - B0 A0) + B0 A0, and the relative
    (weighted) error ||(W - Q - L) diag(d)|| / ||W diag(d)|| after each iteration; the best
    iterate is returned (the alternation is not monotone once quantisation noise dominates)."""
    work = weight.detach().double()
    d = torch.ones(work.shape[1], dtype=work.dtype) if column_weights is None else column_weights.double()
    d = d.clamp_min(d.max() * 1e-6)
    scaler_block = scaler_block_size(work.numel(), config)

    def quantize(target: Tensor) -> Tensor:
        return nf4(target.to(weight.dtype), config.block_size, scaler_block).get_original_weight().double()

    norm = (work * d).norm()
    q = torch.zeros_like(work)
    errors, best = [], None
    for _ in range(iterations):
        u, s, vh = torch.linalg.svd((work - q) * d, full_matrices=False)
        root = s[:rank].sqrt()
        a0, b0 = root[:, None] * vh[:rank] / d, u[:, :rank] * root
        q = quantize(work - b0 @ a0)
        errors.append(float(((work - q - b0 @ a0) * d).norm() / norm))
        if best is None or errors[-1] < best[2]:
            best = (a0, b0, errors[-1])
    return best[0].to(weight.dtype), best[1].to(weight.dtype), errors
