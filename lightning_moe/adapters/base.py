"""What every adapter kind is: a config dataclass and an `nn.Module` that computes the delta of
one adapted linear layer, registered under its `kind`.

Adding a kind is one file (its config beside its adapter, see lora.py for the smallest) plus one
line in `adapters/__init__.py` that imports it. The rest of the core (injection, routing, the
adapter-folder format, checkpoints, exports, continual task boundaries, optimiser groups) only
talks to the `Adapter` interface below.
"""

from __future__ import annotations

import dataclasses
import difflib
from collections.abc import Mapping
from typing import Any, ClassVar

from torch import Tensor, nn

from .errors import AdapterConfigError, AdapterOptionError
from .routing import RoutingCollector, RoutingRecord


@dataclasses.dataclass
class AdapterConfig:
    """The settings of one adapter kind; a subclass per kind, registered with its adapter.

    Its fields are the YAML schema (`adapter: {kind: <kind>, <field>: ...}`) and what
    adapter_config.json records, so a saved adapter is rebuilt exactly.
    """

    kind: ClassVar[str] = ""

    def to_dict(self) -> dict[str, Any]:
        return {"kind": self.kind, **dataclasses.asdict(self)}

    def for_saved_weights(self) -> AdapterConfig:
        """The config that rebuilds a saved adapter: options that only choose the starting
        weights (which the saved ones replace) are dropped, so loading reads no other files."""
        return self


class Adapter(nn.Module):
    """The delta an adapted linear layer adds to its frozen base layer's output.

    A kind overrides what applies to it:
    - `forward(x)`: the delta for input x (the base layer's output is added by `AdaptedLinear`).
    - `mergeable` and `delta_weight()`: for input-independent updates, the dense [out, in]
      delta, so the layer can be merged into its base weight and exported.
    - `router_parameters()`: routers and gates, which train with their own learning rate.
    - `routed`: the kind reports its routing decisions to the collector `inject` binds
      (`bind_routing`), from which the model-level router losses and statistics come.
    - `end_task()` and `task_record`: continual kinds take a step at each task boundary
      (freeze, prune, merge) and say what they kept under `task_record` in the run's record.
    - `prepare(layers)`: kinds that load or compute weights before the layers are attached
      (the mixtures read their expert folders), for all layers of the kind at once.
    """

    kind: ClassVar[str] = ""
    config_class: ClassVar[type[AdapterConfig]] = AdapterConfig
    task_record: ClassVar[str | None] = None
    routed: ClassVar[bool] = False  # reports routing decisions to the model's collector
    # computes the whole layer output with `forward_with_base(x, base_layer)` instead of a delta
    # added to the base layer's (L4Q's quantised W + s B A); merging calls `merged_weight(W)`
    replaces_base: ClassVar[bool] = False

    def __init__(self, base_layer: nn.Linear, config: AdapterConfig) -> None:
        super().__init__()
        self.config = config
        self.layer_name = ""
        self.collector: RoutingCollector | None = None

    @property
    def mergeable(self) -> bool:
        return False

    def delta_weight(self) -> Tensor:
        raise AdapterConfigError(
            f"a {self.kind!r} adapter's update depends on the input (routing), so it has no dense weight; "
            "only plain LoRA and fixed-weight LoRA mixtures merge into the base weight"
        )

    def router_parameters(self) -> list[nn.Parameter]:
        return []

    def bind_routing(self, layer_name: str, collector: RoutingCollector) -> None:
        """Where a routed kind reports this layer's decisions (its records carry `layer_name`)."""
        if self.routed:
            self.layer_name, self.collector = layer_name, collector

    def report_routing(self, lead_shape: tuple[int, ...], logits: Tensor, indices: Tensor) -> None:
        """Hand this pass's decisions ([N, E] logits, [N, k] indices) to the collector, shaped like
        the layer input. Built only while it captures: at a decode step these few small ops per
        layer are a visible share of the time."""
        if self.collector is not None and self.collector.active:
            self.collector.record(
                RoutingRecord(self.layer_name, logits.view(*lead_shape, -1), indices.view(*lead_shape, -1))
            )

    def end_task(self) -> Any:
        """The task-boundary step of continual kinds; returns what it kept (see `task_record`)."""
        return None

    @classmethod
    def prepare(cls, layers: Mapping[str, nn.Module]) -> None:
        """Called once with every new `AdaptedLinear` of this kind, by name, before they attach."""


ADAPTER_KINDS: dict[str, type[Adapter]] = {}


def register_adapter(adapter: type[Adapter]) -> type[Adapter]:
    """Class decorator: make `adapter` the implementation of `adapter.kind` (its config class's kind)."""
    kind = adapter.config_class.kind
    if not kind:
        raise TypeError(f"{adapter.__name__}.config_class must be an AdapterConfig with a `kind`")
    if kind in ADAPTER_KINDS and ADAPTER_KINDS[kind] is not adapter:
        raise TypeError(
            f"adapter kind {kind!r} is registered twice: {ADAPTER_KINDS[kind].__name__}, {adapter.__name__}"
        )
    adapter.kind = kind
    ADAPTER_KINDS[kind] = adapter
    return adapter


def _closest(name: str, known: list[str]) -> str:
    close = difflib.get_close_matches(name, known, n=1, cutoff=0.5)
    return f"; did you mean {close[0]!r}?" if close else ""


def adapter_class(kind: str) -> type[Adapter]:
    if kind not in ADAPTER_KINDS:
        known = sorted(ADAPTER_KINDS)
        raise AdapterOptionError(
            f"unknown adapter kind {kind!r}; expected one of {known}{_closest(str(kind), known)}"
        )
    return ADAPTER_KINDS[kind]


def config_from_dict(data: Mapping[str, Any]) -> AdapterConfig:
    """An adapter config from its mapping form (YAML or adapter_config.json): `kind` plus that
    kind's options; an unknown kind or option is one error naming the closest valid one."""
    if not isinstance(data, Mapping) or "kind" not in data:
        raise AdapterOptionError(
            f"an adapter needs a `kind` (one of {sorted(ADAPTER_KINDS)}), got {dict(data) if isinstance(data, Mapping) else data!r}"
        )
    options = dict(data)
    config_class = adapter_class(options.pop("kind")).config_class
    known = [field.name for field in dataclasses.fields(config_class)]
    for name in options:
        if name not in known:
            raise AdapterOptionError(
                f"a {config_class.kind!r} adapter has no option {name!r}{_closest(name, known)} (its options: {', '.join(known)})"
            )
    return config_class(**options)
