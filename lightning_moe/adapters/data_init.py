"""Data-driven initialisations, computed from the first training batches before step 0.

- `init: eva` (Explained Variance Adaptation, Paischer et al. 2024): an incremental SVD of each
  target layer's inputs; A takes the top right-singular vectors, B = 0. Each layer stops when its
  needed components are stable between batches (cosine >= `eva_tau`). Plain LoRA then
  redistributes ranks by explained variance under the same total budget, each layer capped at
  round(rank * eva_rho), and keeps its scaling (alpha follows the rank). Mixtures of experts and
  rank experts take distinct starting subspaces: expert e (or atom i) gets the e-th slice of the
  top E * r directions.
- `init: lora_ga` (Wang et al. 2024): the mean full-weight gradient of each target over
  `init_batches` batches, G = U S V^T (randomised, as peft's); A = V[:r]^T, B = U[:, r:2r], both times d_out^(1/4)/sqrt(gamma)
  (the paper's stable scale; `lora_ga_scale: peft` takes peft's variant, B also times S[r:2r] and
  only B scaled). The initial product is kept and subtracted (`LoraAdapter.set_initial_factors`),
  so the start equals the base model exactly and adapter-only checkpoints stay valid.

Every layer's result is the same on every process: the caller broadcasts (see the shell's
`AdapterModule`), this module only computes.
"""

from __future__ import annotations

import re
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field, replace
from itertools import islice
from typing import Any

import torch
from torch import Tensor, nn

from .errors import AdapterConfigError
from .incremental_svd import IncrementalSVD, top_singular
from .inject import adapted_layers
from .layer import AdaptedLinear, build_adapter
from .lora import LoraAdapter, LoraConfig
from .quantized import QuantizedLinear
from .rules import AdapterRule

DATA_INITS = ("eva", "lora_ga")
Forward = Callable[[Any], tuple[Tensor, Tensor | None]]  # batch -> (loss, token mask [batch, tokens] or None)


@dataclass
class DataInitReport:
    """What the data-driven inits did: EVA's ranks by layer (0: the layer lost its adapter), which
    layers converged, batches used and seconds taken per init."""

    eva_ranks: dict[str, int] = field(default_factory=dict)
    eva_converged: dict[str, bool] = field(default_factory=dict)
    batches: dict[str, int] = field(default_factory=dict)
    seconds: dict[str, float] = field(default_factory=dict)

    def summary(self) -> str:
        parts = []
        if self.eva_ranks:
            ranks = list(self.eva_ranks.values())
            converged = sum(self.eva_converged.values())
            parts.append(
                f"eva: {len(ranks)} layers, ranks {min(ranks)}-{max(ranks)} (total {sum(ranks)}), "
                f"{converged}/{len(self.eva_converged)} converged in {self.batches['eva']} batches, "
                f"{self.seconds['eva']:.1f} s"
            )
        if "lora_ga" in self.batches:
            parts.append(
                f"lora_ga: gradients of {self.batches['lora_ga']} batches, {self.seconds['lora_ga']:.1f} s"
            )
        return "; ".join(parts)


def layers_with_init(model: nn.Module, init: str) -> dict[str, AdaptedLinear]:
    return {
        name: layer for name, layer in adapted_layers(model) if getattr(layer.config, "init", None) == init
    }


def needs_data(model: nn.Module) -> bool:
    return any(layers_with_init(model, init) for init in DATA_INITS)


def initialise_from_data(model: nn.Module, batches: Iterable, forward: Forward) -> DataInitReport:
    """Run every data-driven init the model's adapters ask for, on the first batches of `batches`."""
    report = DataInitReport()
    wanted = [layers_with_init(model, init) for init in DATA_INITS]
    count = max((layer.config.init_batches for layers in wanted for layer in layers.values()), default=0)
    if count == 0:
        return report
    taken = list(islice(iter(batches), count))
    if not taken:
        inits = sorted({layer.config.init for layers in wanted for layer in layers.values()})
        raise AdapterConfigError(f"init {inits[0]!r} needs training batches, but the training data gave none")
    eva, lora_ga = wanted
    if eva:
        started = time.perf_counter()
        report.eva_ranks, report.eva_converged, report.batches["eva"] = eva_init(model, eva, taken, forward)
        report.seconds["eva"] = time.perf_counter() - started
    if lora_ga:
        started = time.perf_counter()
        report.batches["lora_ga"] = lora_ga_init(model, lora_ga, taken, forward)
        report.seconds["lora_ga"] = time.perf_counter() - started
    return report


# --- EVA -----------------------------------------------------------------------------------------
def _inputs_of(
    layers: dict[str, nn.Module], batch: Any, forward: Forward
) -> tuple[dict[str, Tensor], Tensor | None]:
    """One no-grad forward of `batch`: each layer's input tensor (held, so no later input can
    reuse its memory) and the task's token mask."""
    inputs: dict[str, Tensor] = {}

    def hook(name):
        def record(module, args):
            inputs[name] = args[0].detach()

        return record

    handles = [layer.register_forward_pre_hook(hook(name)) for name, layer in layers.items()]
    try:
        with torch.no_grad():
            _, token_mask = forward(batch)
    finally:
        for handle in handles:
            handle.remove()
    missing = [name for name in layers if name not in inputs]
    if missing:
        raise AdapterConfigError(
            f"a data-driven init: layer {missing[0]!r} was not called by the model's forward pass"
        )
    return inputs, token_mask


def _input_groups(layers: dict[str, AdaptedLinear], batch: Any, forward: Forward) -> list[list[str]]:
    """Layers that see the same input tensor (q/k/v, gate/up) share one SVD, as in peft."""
    inputs, _ = _inputs_of(layers, batch, forward)
    groups: dict[tuple, list[str]] = {}
    for name in layers:  # in module order: a group's first layer holds its SVD (as in peft)
        x = inputs[name]
        groups.setdefault((x.data_ptr(), tuple(x.shape)), []).append(name)
    return list(groups.values())


def eva_init(
    model: nn.Module, layers: dict[str, AdaptedLinear], batches: list, forward: Forward
) -> tuple[dict[str, int], dict[str, bool], int]:
    training = model.training
    model.eval()  # no dropout in the statistics (as peft)
    try:
        return _eva(model, layers, batches, forward)
    finally:
        model.train(training)


def _eva(model, layers, batches, forward):
    needs = {name: max_eva_rank(layer.config) for name, layer in layers.items()}
    for name, need in needs.items():
        width = layers[name].in_features
        if need > width:
            raise AdapterConfigError(
                f"init 'eva': layer {name!r} would take {need} directions of its {width}-dim inputs; "
                f"the rank budget cannot be met (rank * eva_rho, times num_experts, must be <= {width})"
            )
    groups = _input_groups(layers, batches[0], forward)
    # plain LoRA layers compete for the rank budget; experts keep E * r directions each
    flexible = {name for name, layer in layers.items() if isinstance(layer.adapter, LoraAdapter)}
    budget = sum(_eva_budget(layers[name]) for name in flexible)
    svds = {group[0]: IncrementalSVD(max(needs[name] for name in group)) for group in groups}
    converged = {head: torch.zeros(svd.num_components, dtype=torch.bool) for head, svd in svds.items()}
    ranks = dict(needs)
    used = 0
    for batch in batches:
        active = {
            head: layers[head]
            for head, group in zip(svds, groups, strict=True)
            if not converged[head][: max(ranks[name] for name in group)].all()
        }
        if not active:
            break
        used += 1
        for head, rows in _layer_inputs(active, batch, forward).items():
            svd = svds[head]
            if rows.shape[0] < svd.num_components:
                continue  # too few tokens for the SVD this batch (peft skips these too)
            previous = svd.components
            svd.partial_fit(rows)
            if previous is not None:
                tau = layers[head].config.eva_tau
                converged[head] = torch.cosine_similarity(svd.components, previous, dim=1) >= tau
        if all(svd.components is not None for svd in svds.values()):
            ranks |= distribute_ranks(groups, svds, needs, flexible, budget)
    unseen = [head for head, svd in svds.items() if svd.components is None]
    if unseen:
        raise AdapterConfigError(
            f"init 'eva': layer {unseen[0]!r} never saw {svds[unseen[0]].num_components} tokens in one batch; "
            "use larger batches or a smaller rank / eva_rho"
        )
    done = {}
    for group in groups:
        head = group[0]
        for name in group:
            done[name] = bool(converged[head][: ranks[name]].all())
            _apply_eva(model, name, layers[name], svds[head], ranks[name])
    return {name: ranks[name] for name in layers}, done, used


def max_eva_rank(config) -> int:
    """Components a layer may take: its directions (rank, or experts * rank), times eva_rho for LoRA."""
    rho = getattr(config, "eva_rho", 1.0)
    return round(config.rank * rho) * getattr(config, "num_experts", 1)


def _eva_budget(layer: AdaptedLinear) -> int:
    return layer.config.rank * getattr(layer.config, "num_experts", 1)


def _layer_inputs(layers: dict[str, nn.Module], batch: Any, forward: Forward) -> dict[str, Tensor]:
    """The rows each layer received for `batch`, without the tokens the task's mask drops."""
    inputs, token_mask = _inputs_of(layers, batch, forward)
    rows = {}
    for name, x in inputs.items():
        if token_mask is not None and x.dim() == 3 and tuple(x.shape[:2]) == tuple(token_mask.shape):
            x = x[token_mask.bool()]
        rows[name] = x.reshape(-1, x.shape[-1]).float()
    return rows


def input_rms(
    layers: dict[str, nn.Module], batches: Iterable, forward: Forward, count: int
) -> dict[str, Tensor]:
    """Each layer's root mean square input per column over the unmasked tokens of `count`
    batches: the column weights of LQ-LoRA's `lq_weighting: activations`."""
    squares: dict[str, Tensor] = {}
    tokens = dict.fromkeys(layers, 0)
    for batch in islice(batches, count):
        for name, rows in _layer_inputs(layers, batch, forward).items():
            squares[name] = squares.get(name, 0) + rows.double().square().sum(0)
            tokens[name] += rows.shape[0]
    if not squares:
        raise AdapterConfigError(
            "lq_weighting 'activations' needs calibration batches; the training data gave none"
        )
    return {name: (squares[name] / tokens[name]).sqrt() for name in layers}


def distribute_ranks(
    groups: list[list[str]],
    svds: dict[str, IncrementalSVD],
    needs: dict[str, int],
    flexible: set[str],
    budget: int,
) -> dict[str, int]:
    """The `budget` directions of highest explained-variance ratio over the `flexible` layers
    (each offering its first needs[name]), counted per layer; within a group sharing one SVD the
    first layer takes the largest count (peft's rule)."""
    keys, values = [], []
    for group in groups:
        ratio = svds[group[0]].explained_variance_ratio
        for name in group:
            if name in flexible:
                keys += [name] * needs[name]
                values.append(ratio[: needs[name]])
    if not keys:
        return {}
    order = torch.cat(values).argsort(descending=True, stable=True)
    counts = dict.fromkeys(keys, 0)
    for index in order[:budget].tolist():
        counts[keys[index]] += 1
    for group in groups:
        names = [name for name in group if name in flexible]
        for name in names[1:]:
            if counts[name] > counts[names[0]]:
                counts[names[0]], counts[name] = counts[name], counts[names[0]]
    return counts


@torch.no_grad()
def _apply_eva(model: nn.Module, name: str, layer: AdaptedLinear, svd: IncrementalSVD, rank: int) -> None:
    config = layer.config
    directions = svd.components
    if getattr(config, "eva_whiten", False):
        directions = directions / svd.singular_values.sqrt()[:, None]
    if isinstance(layer.adapter, LoraAdapter):
        if rank == 0:  # no direction of this layer made the budget: it keeps no adapter (as in peft)
            parent, _, attribute = name.rpartition(".")
            setattr(model.get_submodule(parent), attribute, layer.base_layer)
            return
        if rank != config.rank:
            resized = replace(config, rank=rank, alpha=_alpha_for_rank(config, rank))
            layer.adapter = build_adapter(resized, layer.base_layer).to(layer.base_layer.weight.device)
            layer.config = resized
    target = layer.adapter.input_projection()
    count = target.shape[:-1].numel()
    target.copy_(directions[:count].reshape(target.shape).to(target.dtype))


def _alpha_for_rank(config: LoraConfig, rank: int) -> float:
    """The alpha that keeps the layer's scaling (alpha / r, or / sqrt(r)) at the new rank."""
    return config.scaling * (rank**0.5 if config.use_rslora else rank)


def resolved_rules(rules: list[AdapterRule], model: nn.Module, report: DataInitReport) -> list[AdapterRule]:
    """The rules with EVA's outcome written in: a rule any of whose layers changed rank (or lost
    its adapter) becomes one rule per surviving layer, so checkpoints, adapter folders and PEFT
    exports (rank_pattern) carry the ranks."""
    layers = dict(adapted_layers(model))
    resized = {
        name
        for name in report.eva_ranks
        if name not in layers or layers[name].config != _rule_config(rules, name)
    }
    if not resized:
        return rules
    kept = []
    for rule in rules:
        names = [name for name in report.eva_ranks if rule.matches(name)]
        if not resized.intersection(names):
            kept.append(rule)
            continue
        kept += [
            AdapterRule(targets=[re.escape(name)], adapter=layers[name].config, regex=True)
            for name in names
            if name in layers
        ]
    return kept


def _rule_config(rules: list[AdapterRule], name: str):
    return next((rule.config for rule in rules if rule.matches(name)), None)


# --- LoRA-GA ------------------------------------------------------------------------------------
def lora_ga_init(model: nn.Module, layers: dict[str, AdaptedLinear], batches: list, forward: Forward) -> int:
    """Average the full-weight gradient of every target over its `init_batches` batches (the
    base weights require grad only here), then set each layer's factors from its SVD."""
    quantized = [name for name, layer in layers.items() if isinstance(layer.base_layer, QuantizedLinear)]
    if quantized:
        raise AdapterConfigError(
            f"init 'lora_ga' needs the full-weight gradient of a full-precision base; {quantized[0]!r} "
            "is quantised (use init 'lq_lora' or 'eva' on a quantised base)"
        )
    weights = {name: layer.base_layer.weight for name, layer in layers.items()}
    flags = [(p, p.requires_grad) for p in model.parameters()]
    sums = {name: torch.zeros_like(weight, dtype=torch.float32) for name, weight in weights.items()}
    count = max(layer.config.init_batches for layer in layers.values())
    try:
        model.requires_grad_(False)
        for weight in weights.values():
            weight.requires_grad_(True)
        for batch in batches[:count]:
            for weight in weights.values():
                weight.grad = None
            loss, _ = forward(batch)
            loss.backward()
            for name, weight in weights.items():
                sums[name] += weight.grad.float()
    finally:
        for parameter, flag in flags:
            parameter.requires_grad_(flag)
        for weight in weights.values():
            weight.grad = None
    used = min(count, len(batches))
    for name, layer in layers.items():
        lora_A, lora_B = lora_ga_factors(sums[name] / used, layer.config)
        layer.adapter.set_initial_factors(lora_A, lora_B)
    return used


def lora_ga_factors(gradient: Tensor, config: LoraConfig) -> tuple[Tensor, Tensor]:
    """A [r, in], B [out, r] from the SVD of the mean gradient [out, in] (see the module docstring)."""
    rank = config.rank
    if 2 * rank > min(gradient.shape):
        raise AdapterConfigError(
            f"init 'lora_ga' takes 2 * rank = {2 * rank} singular vectors of a {list(gradient.shape)} gradient; "
            f"the rank budget cannot be met, use rank <= {min(gradient.shape) // 2}"
        )
    u, s, vh = top_singular(gradient, 2 * rank)
    lora_A, lora_B = vh[:rank], u[:, rank : 2 * rank]
    factor = gradient.shape[0] ** 0.25 / config.lora_ga_gamma**0.5
    if config.lora_ga_scale == "peft":
        lora_B = lora_B * s[rank : 2 * rank] * factor
    else:
        lora_A, lora_B = lora_A * factor, lora_B * factor
    return lora_A.float(), lora_B.float()
