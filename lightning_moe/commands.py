"""Commands beside Lightning's fit, validate, test and predict (the continual suite, ...).

The package that owns a command registers it as an entry point in the group
`lightning_moe.commands` (pyproject.toml), naming a `main(args: list[str])` function whose
docstring's first line is the command's one-line description in `--help`. The shell finds
commands by name there and loads one only when it runs (or when `--help` lists them), so it
never imports a domain at start and no import circle forms between a command and the CLI it
calls back into.
"""

from __future__ import annotations

from collections.abc import Callable
from importlib.metadata import EntryPoint, entry_points

GROUP = "lightning_moe.commands"


def registered_commands() -> dict[str, EntryPoint]:
    return {entry.name: entry for entry in entry_points(group=GROUP)}


def command(name: str) -> Callable[[list[str]], object] | None:
    """The `main` of the registered command `name`, or None when there is no such command."""
    entry = registered_commands().get(name)
    return entry.load() if entry is not None else None


def command_summaries() -> dict[str, str]:
    """Each registered command's one-line description (the first line of its `main` docstring)."""
    summaries = {}
    for name, entry in sorted(registered_commands().items()):
        doc = (entry.load().__doc__ or "").strip()
        summaries[name] = doc.splitlines()[0] if doc else ""
    return summaries
