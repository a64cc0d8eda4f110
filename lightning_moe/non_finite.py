"""The non-finite guard: a run stops at the first step whose loss terms or gradients are NaN or
infinite, naming the step and the term, before the optimizer applies them; and nothing
non-finite is ever written to a checkpoint.

Every process takes part in the decision (one all-reduce of a flag per check), so under DDP or
FSDP2, where losses and gradient shards differ per process, all stop together instead of the
others waiting forever on the one that stopped.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

import lightning as L
import torch
from torch import Tensor
from torch.distributed.tensor import DTensor

from lightning_moe.errors import NonFiniteError


def _local(tensor: Tensor) -> Tensor:
    return tensor.to_local() if isinstance(tensor, DTensor) else tensor


def _is_finite(tensor: Tensor) -> Tensor:
    return torch.isfinite(_local(tensor).detach()).all()


def _any_process(module: L.LightningModule, bad: bool) -> bool:
    trainer = module._trainer  # None for a module used on its own, outside a Trainer
    if trainer is not None and trainer.world_size > 1:
        return bool(trainer.strategy.reduce_boolean_decision(bad, all=False))
    return bad


def stop_on_non_finite_terms(module: L.LightningModule, terms: Mapping[str, Tensor]) -> None:
    """Raise NonFiniteError when any of the named loss terms is NaN or infinite on any process."""
    finite = torch.stack([_is_finite(value) for value in terms.values()])
    if not _any_process(module, not bool(finite.all())):
        return
    named = [
        f"the {name} is {float(value.detach()):g}" for name, value in terms.items() if not _is_finite(value)
    ]
    what = ", ".join(named) if named else "a loss term is non-finite on another process"
    raise NonFiniteError(
        f"training stopped at step {module.global_step}: {what}; nothing of this step was applied, and the "
        "checkpoints written before it stay (lower the learning rate, or check the data)"
    )


def stop_on_non_finite_gradients(module: L.LightningModule, parameters: Iterable[torch.nn.Parameter]) -> None:
    """Raise NonFiniteError when a gradient about to be applied is NaN or infinite anywhere."""
    grads = [p.grad for p in parameters if p.grad is not None]
    if not grads:
        return
    finite = torch.stack([_is_finite(grad) for grad in grads])
    if not _any_process(module, not bool(finite.all())):
        return
    names = [name for name, p in module.named_parameters() if p.grad is not None and not _is_finite(p.grad)]
    where = f"the gradient of {names[0]}" + (f" (and {len(names) - 1} more)" if len(names) > 1 else "")
    raise NonFiniteError(
        f"training stopped at step {module.global_step}: {where if names else 'a gradient on another process'} "
        "is non-finite; the optimizer did not apply it, and the checkpoints written before this step stay"
    )


def check_finite_state(state: Mapping[str, Tensor], where: str) -> None:
    """Refuse to save a state that holds a NaN or infinite value."""
    for key, value in state.items():
        if isinstance(value, Tensor) and value.is_floating_point() and not bool(_is_finite(value)):
            raise NonFiniteError(f"refusing to write {where}: {key} holds non-finite values")
