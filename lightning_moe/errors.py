"""The errors a run stops with, each shown to the user as one `error:` line by the CLI."""

from __future__ import annotations

from lightning_moe.adapters.errors import UserInputError


class ConfigError(UserInputError):
    """A config or command-line argument that does not parse (exit code 2)."""


class NonFiniteError(RuntimeError):
    """Training produced a non-finite loss term or gradient; the run stops at that step."""
