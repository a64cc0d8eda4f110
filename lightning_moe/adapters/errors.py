"""Errors that name the bad value and what was expected, raised before any training starts."""

from __future__ import annotations

from typing import ClassVar


class UserInputError(ValueError):
    """Bad input from the user (config, checkpoint, data), as opposed to a bug.

    The newest instance is remembered so the CLI can show just its message even when a config
    library wrapped it into a long error of its own.
    """

    latest: ClassVar[UserInputError | None] = None

    def __init__(self, message: str) -> None:
        super().__init__(message)
        UserInputError.latest = self


class AdapterConfigError(UserInputError):
    """An adapter configuration or injection spec that cannot work."""


class AdapterCheckpointError(UserInputError):
    """An adapter file that is missing, corrupt, or was saved for another model."""
