"""Injection rules: which modules of a model get which adapter (the papers' presets are in presets.py).

In YAML a rule is `{targets: [...], adapter: {kind: <kind>, <option>: ...}, regex: false}`; the
`adapter` mapping is checked against its kind's config class (`base.config_from_dict`), so a
misspelt option is one error that names the closest valid one.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any

from .base import AdapterConfig, config_from_dict
from .errors import AdapterConfigError, AdapterOptionError


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
        adapter: The adapter each matched linear layer receives: `kind` and that kind's options,
            e.g. {kind: moe, num_experts: 4, top_k: 1} (from Python also a config object).
        regex: Treat `targets` as regular expressions matched against the full module name.
    """

    targets: list[str]
    adapter: dict[str, Any] | AdapterConfig
    regex: bool = False
    config: AdapterConfig = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        if not self.targets:
            raise AdapterConfigError("an adapter rule needs at least one target pattern, got targets=[]")
        if isinstance(self.adapter, AdapterConfig):
            self.config, self.adapter = self.adapter, self.adapter.to_dict()
            return
        try:
            self.config = config_from_dict(self.adapter)
        except AdapterConfigError as error:
            raise type(error)(f"adapter rule for {self.targets}: {error}") from None
        except TypeError as error:  # a value of the wrong type reaches the dataclass
            raise AdapterOptionError(f"adapter rule for {self.targets}: {error}") from None

    def matches(self, name: str) -> bool:
        return any(target_matches(name, pattern, self.regex) for pattern in self.targets)

    def to_dict(self) -> dict:
        return {"targets": list(self.targets), "adapter": self.config.to_dict(), "regex": self.regex}

    @classmethod
    def from_dict(cls, data: dict) -> AdapterRule:
        return cls(
            targets=list(data["targets"]), adapter=dict(data["adapter"]), regex=data.get("regex", False)
        )
