"""`inject(model, rules)`: put adapters into any torch model, in place, and freeze the rest."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

from torch import nn

from .attention import restore_attention, unfuse_attention
from .base import ADAPTER_KINDS, AdapterConfig
from .errors import AdapterConfigError
from .layer import AdaptedLinear, build_adapter
from .routing import RoutingCollector
from .rules import AdapterRule, target_matches


@dataclass
class InjectionReport:
    """What `inject` did: adapted module names with their kind, parameter counts, and the
    collector that the model's routers report to."""

    adapted: dict[str, str]
    trainable_parameters: int
    total_parameters: int
    collector: RoutingCollector = field(repr=False)

    def summary(self) -> str:
        kinds = sorted(set(self.adapted.values()))
        share = 100.0 * self.trainable_parameters / max(self.total_parameters, 1)
        return (
            f"adapted {len(self.adapted)} linear layers ({', '.join(kinds)}); trainable parameters: "
            f"{self.trainable_parameters:,} of {self.total_parameters:,} ({share:.3f}%)"
        )


def plan_injection(model: nn.Module, rules: list[AdapterRule]) -> dict[str, AdapterConfig]:
    """Resolve rules to {module name: adapter config}, failing loudly on any mismatch."""
    modules = dict(model.named_modules())
    plan: dict[str, AdapterConfig] = {}
    claimed_by: dict[str, str] = {}
    for rule in rules:
        for pattern in rule.targets:
            names = [name for name in modules if name and target_matches(name, pattern, rule.regex)]
            if not names:
                raise AdapterConfigError(
                    f"target pattern {pattern!r} matched no module of {type(model).__name__}; "
                    f"linear layers look like: {_example_linear_names(modules)}"
                )
            for name in names:
                _check_target(name, pattern, modules)
                if name in plan:
                    raise AdapterConfigError(
                        f"module {name!r} is matched by both {claimed_by[name]!r} and {pattern!r}; "
                        "each layer takes one adapter"
                    )
                plan[name] = rule.config
                claimed_by[name] = pattern
    return plan


def inject(
    model: nn.Module,
    rules: list[AdapterRule],
    freeze_base: bool = True,
    prepare: Callable[[dict[str, AdaptedLinear]], None] | None = None,
) -> InjectionReport:
    """Replace every matched nn.Linear by an `AdaptedLinear` (in place) and freeze the rest.

    An nn.MultiheadAttention whose "<name>.in_proj" (the packed q/k/v projection) or
    "<name>.out_proj" a rule targets is first swapped for the equivalent
    `LinearMultiheadAttention`, whose projections are real linears (see attention.py).

    Raises `AdapterConfigError` before changing what the model computes when a pattern matches
    nothing, a match is not a linear layer the model calls, or two rules claim the same layer.
    Each kind's `Adapter.prepare` then sees the new layers (the LoRA mixtures read their expert
    folders there), and `prepare` after it (e.g. to load saved weights); both happen before the
    layers are attached, so an error there also leaves the model as it was.
    """
    unfused = unfuse_attention(model, targeted_attention(model, rules))
    try:
        plan = plan_injection(model, rules)
        layers = {}
        for name, config in plan.items():
            base_layer = model.get_submodule(name)
            layers[name] = AdaptedLinear(base_layer, build_adapter(config, base_layer), config)
            layers[name].train(base_layer.training)  # new modules start in train mode; follow the model's
        prepare_kinds(layers)
        if prepare is not None:
            prepare(layers)
    except Exception:
        restore_attention(model, unfused)
        raise
    if freeze_base:  # everything the model has so far, earlier adapters included; the new ones train
        model.requires_grad_(False)
    collector = RoutingCollector()
    for name, layer in layers.items():
        layer.adapter.bind_routing(name, collector)
        parent_name, _, attribute = name.rpartition(".")
        setattr(model.get_submodule(parent_name), attribute, layer)
    total = sum(p.numel() for p in model.parameters())
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return InjectionReport({n: c.kind for n, c in plan.items()}, trainable, total, collector)


def describe_injection(model: nn.Module, collector: RoutingCollector) -> InjectionReport:
    """The report of a model's adapters as they are now (after a data-driven init resized some)."""
    total = sum(p.numel() for p in model.parameters())
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return InjectionReport(
        {n: layer.config.kind for n, layer in adapted_layers(model)}, trainable, total, collector
    )


def prepare_kinds(layers: dict[str, AdaptedLinear]) -> None:
    """Each kind's `prepare`, once, with every new layer (kinds that share one, like the two LoRA
    mixtures, read their shared expert folders once for all their layers)."""
    seen = set()
    for layer in layers.values():
        prepare = type(layer.adapter).prepare
        if prepare.__func__ not in seen:
            seen.add(prepare.__func__)
            prepare(layers)


def targeted_attention(model: nn.Module, rules: list[AdapterRule]) -> list[str]:
    """The nn.MultiheadAttention modules whose in- or out-projection some rule targets."""
    return [
        name
        for name, module in model.named_modules()
        if isinstance(module, nn.MultiheadAttention)
        and any(
            target_matches(f"{name}.{projection}", pattern, rule.regex)
            for rule in rules
            for pattern in rule.targets
            for projection in ("in_proj", "out_proj")
        )
    ]


def adapted_layers(model: nn.Module) -> Iterator[tuple[str, AdaptedLinear]]:
    for name, module in model.named_modules():
        if isinstance(module, AdaptedLinear):
            yield name, module


def routing_collector(model: nn.Module) -> RoutingCollector | None:
    """The collector the model's routers share (None when it has no routed adapter)."""
    for _, layer in adapted_layers(model):
        if layer.adapter.routed:
            return layer.adapter.collector
    return None


def end_task(model: nn.Module) -> dict[str, dict[str, Any]]:
    """After training a task, every continual adapter's task-boundary step (MoRA freezes and
    prunes its atoms, CoDyRA merges its surviving ranks, MoE-Adapters freezes its most used
    experts). Returns what each layer kept, under each continual kind's `task_record` (empty for
    kinds the model does not use)."""
    records = {kind.task_record: {} for kind in ADAPTER_KINDS.values() if kind.task_record}
    for name, layer in adapted_layers(model):
        if layer.adapter.task_record:
            records[layer.adapter.task_record][name] = layer.adapter.end_task()
    return records


def merge_adapters(model: nn.Module) -> None:
    """Merge every adapter into its base weight; if any layer cannot be merged, merge none."""
    layers = list(adapted_layers(model))
    for name, layer in layers:
        if not layer.mergeable:
            raise AdapterConfigError(
                f"cannot merge layer {name!r}: it has a {layer.config.kind!r} adapter, whose update depends on "
                "the input (routing); only plain LoRA and fixed-weight LoRA mixtures merge into the base weight "
                "(nothing was merged)"
            )
    for _, layer in layers:
        layer.merge()


def unmerge_adapters(model: nn.Module) -> None:
    for _, layer in adapted_layers(model):
        layer.unmerge()


@contextmanager
def adapters_disabled(model: nn.Module) -> Iterator[None]:
    """Inside, every adapted layer computes its frozen base layer alone, so the model IS its base
    model (bit for bit: nothing else of it changed). Merged layers are refused: their base weight
    holds the update."""
    layers = [layer for _, layer in adapted_layers(model)]
    if any(layer.merged for layer in layers):
        raise AdapterConfigError("cannot switch adapters off while they are merged; unmerge them first")
    for layer in layers:
        layer.enabled = False
    try:
        yield
    finally:
        for layer in layers:
            layer.enabled = True


def _check_target(name: str, pattern: str, modules: dict[str, nn.Module]) -> None:
    module = modules[name]
    if isinstance(module, AdaptedLinear):
        raise AdapterConfigError(f"module {name!r} (pattern {pattern!r}) already has an adapter")
    if not isinstance(module, nn.Linear):
        hint = (
            f" (target its projections: '{pattern}.in_proj', '{pattern}.out_proj')"
            if isinstance(module, nn.MultiheadAttention)
            else ""
        )
        raise AdapterConfigError(
            f"pattern {pattern!r} matched {name!r}, a {type(module).__name__}; adapters attach to nn.Linear "
            f"layers{hint}"
        )


def _example_linear_names(modules: dict[str, nn.Module], limit: int = 6) -> str:
    names = [name for name, module in modules.items() if isinstance(module, nn.Linear)]
    if not names:
        return "(this model has no nn.Linear layers)"
    shown = ", ".join(repr(n) for n in names[:limit])
    return shown + (f", ... ({len(names)} in all)" if len(names) > limit else "")
