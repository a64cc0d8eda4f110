"""Errors of the adapter core, each naming the bad value and what was expected. They are raised
before a model changes, and the CLI shows each as one `error:` line."""

from __future__ import annotations


class AdapterError(ValueError):
    """Bad input to the adapter core (a config, a rule, an adapter folder), as opposed to a bug."""


class AdapterConfigError(AdapterError):
    """An adapter configuration or injection spec that cannot work."""


class AdapterOptionError(AdapterConfigError):
    """An adapter mapping that names an unknown kind or option, or gives an option a value of the
    wrong type: the config itself is wrong, as when a key does not parse."""


class AdapterCheckpointError(AdapterError):
    """An adapter file that is missing, corrupt, or was saved for another model."""
