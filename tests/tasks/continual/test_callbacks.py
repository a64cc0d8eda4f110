"""CoDyRA's gate shrinkage schedule over a continual stream's tasks."""

from types import SimpleNamespace

import pytest
import torch
from torch import nn

from lightning_moe.adapters import AdapterRule, CodyraConfig, inject
from lightning_moe.tasks.continual import RankGateShrinkage


def gated_linear() -> nn.Sequential:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 5))
    inject(model, [AdapterRule(targets=["0"], adapter=CodyraConfig(rank=4, alpha=8))])
    return model


@pytest.mark.parametrize(
    ("epoch", "batch_idx", "progress"),
    [(0, 0, 1 / 8), (0, 3, 4 / 8), (1, 3, 8 / 8), (2, 1, 2 / 8)],  # 2 epochs of 4 batches per task
)
def test_the_shrinkage_rises_over_each_task(epoch, batch_idx, progress):
    model = gated_linear()
    with torch.no_grad():
        model[0].adapter.rank_gates.copy_(torch.tensor([1.0, -1.0, 0.01, 0.5]))
    gates = model[0].adapter.rank_gates
    groups = [{"lr": 9.0, "params": []}, {"lr": 0.1, "params": [gates]}]  # the gates train at 0.1
    trainer = SimpleNamespace(
        num_training_batches=4,
        accumulate_grad_batches=1,
        max_epochs=6,
        current_epoch=epoch,
        optimizers=[SimpleNamespace(param_groups=groups)],
    )
    RankGateShrinkage(penalty=2.0, epochs_per_task=2).on_train_batch_end(
        trainer, model, None, None, batch_idx
    )
    amount = 0.1 * 2.0 * progress  # the gates' learning rate x penalty x progress in the task
    expected = torch.tensor([1.0 - amount, -1.0 + amount, 0.0, 0.5 - amount])
    torch.testing.assert_close(model[0].adapter.rank_gates.detach(), expected)
