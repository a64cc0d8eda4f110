"""The errors a run stops with. The CLI shows each as one `error:` line: these, and the adapter
core's `AdapterError`s (which the core raises without knowing the shell)."""

from __future__ import annotations

from lightning_moe.adapters.errors import AdapterError


class UserInputError(ValueError):
    """Bad input from the user (config, checkpoint, data, reward), as opposed to a bug."""


class ConfigError(UserInputError):
    """A config or command-line argument that does not parse (exit code 2)."""


class NonFiniteError(RuntimeError):
    """Training produced a non-finite loss term or gradient; the run stops at that step."""


# what the CLI reports as one `error:` line instead of a traceback
STOPPING_ERRORS = (UserInputError, AdapterError, NonFiniteError)
