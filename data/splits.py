"""The one check every DataModule makes of its training split before `fit` trains."""

from __future__ import annotations

from collections.abc import Sized

from lightning_moe.errors import UserInputError


def require_training_examples(examples: Sized, datamodule: object, why: str = "") -> None:
    """One clear error, before anything trains, when the training split is empty (Lightning
    would print "No training batches", finish, and export an untrained adapter)."""
    if len(examples) == 0:
        reason = f": {why}" if why else ""
        raise UserInputError(
            f"{type(datamodule).__name__} has no training examples{reason}; fit needs at least one"
        )
