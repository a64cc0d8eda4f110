"""DyLoRA in the shell: the validation sweep over ranks, and `python -m lightning_moe truncate`.

`RankSweep` evaluates the validation loss at each rank after every validation and logs it as
one curve (x: the rank) plus a table, so one training shows what every rank would give.
`truncate ADAPTER_DIR --rank B --output DIR` writes the rank-B plain LoRA inside a trained DyLoRA
folder (`adapters.dylora.truncate_folder`), which every command and PEFT export then reads.
"""

from __future__ import annotations

from itertools import islice
from pathlib import Path

import lightning as L
import torch
from jsonargparse import ArgumentParser
from lightning.fabric.utilities.apply_func import move_data_to_device
from lightning.pytorch.utilities import rank_zero_info

from lightning_moe.adapters.dylora import dylora_ranks, set_eval_rank, truncate_folder
from lightning_moe.adapters.errors import AdapterError
from lightning_moe.errors import UserInputError
from lightning_moe.task import TaskModule
from lightning_moe.tensorboard_views import add_text, markdown_table


class RankSweep(L.Callback):
    """After each validation, the mean validation loss of the DyLoRA model at every rank in
    `ranks` (None: 1, 2, 4, ... and r), over the first `max_batches` validation batches.

    Logged: TensorBoard scalars `dylora/val_loss_by_rank/step_<N>` with the rank as x (one curve
    per validation), a text table `dylora/rank_sweep`, and one line in the log.
    """

    def __init__(self, ranks: list[int] | None = None, max_batches: int = 4) -> None:
        self.ranks = ranks
        self.max_batches = max_batches
        self.last: dict[int, float] = {}

    def sweep_ranks(self, pl_module: TaskModule) -> list[int]:
        available = dylora_ranks(pl_module.model)
        if not available:
            raise UserInputError("RankSweep needs DyLoRA adapters (kind: dylora); this model has none")
        if self.ranks is None:
            top = available[-1]
            return sorted({2**k for k in range(top.bit_length()) if 2**k <= top} | {top})
        bad = [rank for rank in self.ranks if rank not in available]
        if bad:
            raise UserInputError(f"RankSweep rank {bad[0]} is outside the DyLoRA ranks 1..{available[-1]}")
        return list(self.ranks)

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.sweep_ranks(pl_module)  # a bad rank list is refused before training

    @torch.no_grad()
    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.sanity_checking or not trainer.val_dataloaders:
            return
        loader = trainer.val_dataloaders
        batches = list(islice(iter(loader[0] if isinstance(loader, list) else loader), self.max_batches))
        self.last = {}
        try:
            for rank in self.sweep_ranks(pl_module):
                set_eval_rank(pl_module.model, rank)
                losses = [pl_module.task_loss(move_data_to_device(b, pl_module.device))[0] for b in batches]
                self.last[rank] = float(torch.stack(losses).mean())
        finally:
            set_eval_rank(pl_module.model, None)
        step = trainer.global_step
        experiment = getattr(trainer.logger, "experiment", None)
        if hasattr(experiment, "add_scalar") and trainer.is_global_zero:
            for rank, loss in self.last.items():
                experiment.add_scalar(f"dylora/val_loss_by_rank/step_{step}", loss, global_step=rank)
        rows = [[str(rank), f"{loss:.4f}"] for rank, loss in self.last.items()]
        if trainer.is_global_zero:
            add_text(trainer.logger, "dylora/rank_sweep", markdown_table(["rank", "val loss"], rows), step)
        rank_zero_info(
            f"DyLoRA validation loss by rank at step {step}: "
            + ", ".join(f"r{rank} {loss:.4f}" for rank, loss in self.last.items())
        )


def main(args: list[str] | None = None) -> Path:
    """write the rank-B plain LoRA inside a trained DyLoRA adapter folder as its own folder"""
    parser = ArgumentParser(prog="python -m lightning_moe truncate", description=__doc__)
    parser.add_argument("adapter_dir", type=str, help="A saved adapter folder with DyLoRA layers.")
    parser.add_argument("--rank", type=int, required=True, help="The rank B to keep (1..r).")
    parser.add_argument(
        "--output", type=str, required=True, help="The new folder (must not hold an adapter)."
    )
    settings = parser.parse_args(args)
    try:
        written = truncate_folder(settings.adapter_dir, settings.rank, settings.output)
    except AdapterError as error:
        raise UserInputError(str(error)) from None
    print(f"wrote the rank-{settings.rank} LoRA of {settings.adapter_dir} to {written}")
    return written
