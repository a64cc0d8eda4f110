"""Errors that name the bad value and what was expected, raised before any training starts."""


class AdapterConfigError(ValueError):
    """An adapter configuration or injection spec that cannot work."""


class AdapterCheckpointError(ValueError):
    """An adapter file that is missing, corrupt, or was saved for another model."""
