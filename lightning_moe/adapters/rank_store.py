"""What the continual adapters share: fixed-capacity stores of frozen ranks (MoRA's frozen atoms,
CoDyRA's merged ranks), whose shapes never change so checkpoints of every task fit one model,
and finding the layers that hold an adapter of a given type."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from .errors import AdapterConfigError


@torch.no_grad()
def append_ranks(store_A: Tensor, store_B: Tensor, count: Tensor, A: Tensor, B: Tensor, full: str) -> None:
    """Write ranks A [k, in], B [out, k] after the `count` used ones of the store (A rows, B
    columns) and advance `count`; `full` is the error when they do not fit."""
    start, added = int(count), A.shape[0]
    if start + added > store_A.shape[0]:
        raise AdapterConfigError(full)
    store_A[start : start + added] = A
    store_B[:, start : start + added] = B
    count += added


def layers_with_adapter(model: nn.Module, adapter_type: type) -> list[tuple[str, nn.Module]]:
    """(name, adapted layer) of every layer whose adapter is an `adapter_type`."""
    return [
        (name, module)
        for name, module in model.named_modules()
        if isinstance(getattr(module, "adapter", None), adapter_type)
    ]
