"""Continual learning with CLIP: one adapted CLIP trained on a stream of tasks, and the accuracy
matrix that the continual-learning metrics read.

The stream (`data.continual_streams`) trains task e // epochs_per_task in epoch e. Classification
is CLIP's: logits = logit_scale * image features @ class head^T, where a class head averages
the encoded prompts of a class's templates. The head covers the current task's classes in a
task-incremental stream, and every class seen so far in a class-incremental one.

Evaluation (`accuracy_row`) tests every task of the stream, past and future:
- before training: the zero-shot matrix Z, where Z[i][j] uses the head that the protocol would
  use on task j after task i (task-incremental rows are all equal). Its diagonal is the
  zero-shot row z;
- after training task i: row i of the matrix a. A class-incremental head covers the classes of
  tasks 0..i, so images of later classes are counted as wrong. Those are real zeros.

Class heads are cached, and rebuilt for every evaluation when the text tower has trainable
parameters. At each task end, every continual adapter takes its task-boundary step
(`adapters.continual.end_task`: MoRA freezes atoms, CoDyRA merges ranks, MoE-Adapters freezes
experts), and the optimizer's state is cleared before the next task.

Outputs in the run folder: `accuracy_matrix.json` and `.npy` (plus `zero_shot_matrix.npy`),
rewritten after each task, and `tasks/task<i>/` adapter folders. TensorBoard receives the
accuracy of every task at each task end, a heatmap of the matrix, and the ranks, atoms or
experts each continual adapter kept.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from lightning.pytorch.loggers import TensorBoardLogger
from torch import Tensor
from torch.nn import functional as F
from torchmetrics.classification import MulticlassAccuracy

from lightning_moe.adapters import adapted_layers, end_task, set_active_task
from lightning_moe.data.continual_streams import ContinualStream
from lightning_moe.errors import UserInputError
from lightning_moe.module import AdapterModule
from lightning_moe.tasks.continual.callbacks import RankGateShrinkage
from lightning_moe.tasks.continual.clip_models import (
    ImageFeatureCache,
    build_clip,
    class_head,
    text_tower_trains,
)
from lightning_moe.tasks.continual.report import ContinualRecord, matrix_figure


class ContinualClipTask(AdapterModule):
    """A CLIP with adapters, trained task after task on a continual stream.

    Args:
        clip: "packaged" (EfficientNet-Lite0 + MiniLM) or "open_clip:<model>/<tag>".
        clip_config: Instead: open_clip.CLIP arguments for a random model (tests).
        clip_path: A folder with `clip.safetensors` (the aligned packaged CLIP).
        embed_dim: Width of the shared embedding of the packaged CLIP.
        image_size: Image side the vision tower sees; the CLI links it from the stream's.
        data: The continual stream it learns (the CLI links the data module here).
        rank_gate_penalty: CoDyRA's L1 penalty on its rank gates at the end of each task, reached
            by a rising schedule (`RankGateShrinkage`); 0: no shrinkage.
        cache_dir: Where packaged assets are cached.
        **kwargs: Adapters and optimisation settings of `AdapterModule`.
    """

    def __init__(
        self,
        clip: str = "packaged",
        clip_config: dict[str, Any] | None = None,
        clip_path: str | None = None,
        embed_dim: int = 256,
        image_size: int = 96,
        data: ContinualStream | None = None,
        rank_gate_penalty: float = 0.0,
        cache_dir: str | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        if data is None:
            raise UserInputError(
                "ContinualClipTask learns a continual stream: give data: TaskIncrementalStream or "
                "ClassIncrementalStream"
            )
        self.data = data
        self.rank_gate_penalty = rank_gate_penalty
        self.clip_name = clip
        self.clip_config = clip_config
        self.clip_path = clip_path
        self.embed_dim = embed_dim
        self.image_size = image_size
        self.cache_dir = cache_dir
        self.image_features = ImageFeatureCache()
        self.heads: dict[tuple[int, int], Tensor] = {}
        self.record: ContinualRecord | None = None

    def build_model(self):
        return build_clip(
            self.clip_name, self.clip_config, self.clip_path, self.embed_dim, self.image_size, self.cache_dir
        )

    # --- the protocol ---------------------------------------------------------------------
    @property
    def stream(self) -> ContinualStream:
        return self.data

    def configure_callbacks(self) -> list:
        if self.rank_gate_penalty <= 0:
            return []
        return [RankGateShrinkage(self.rank_gate_penalty, epochs_per_task=self.stream.epochs_per_task)]

    def head_span(self, target: int, learned: int) -> tuple[int, int]:
        """The tasks (start, stop) whose classes the head for task `target` covers once tasks
        0..learned are (being) learned."""
        return (0, learned + 1) if self.stream.class_incremental else (target, target + 1)

    def router_for(self, target: int, learned: int) -> int | None:
        """Which task's routers (MoE-Adapters) classify task `target`: its own if trained, none
        (the frozen CLIP) if not; class-incremental evaluation has no task identity: the latest."""
        if self.stream.class_incremental:
            return learned
        return target if target <= learned else None

    def head(self, start: int, stop: int) -> Tensor:
        """Class weights of tasks start..stop-1, in the stream's class order."""
        if self.model.training and text_tower_trains(self.model):
            return self._encode_head(start, stop)  # with gradients, changing every step
        if (start, stop) not in self.heads:
            with torch.no_grad():
                self.heads[(start, stop)] = self._encode_head(start, stop)
        return self.heads[(start, stop)]

    def _encode_head(self, start: int, stop: int) -> Tensor:
        tasks = self.stream.tasks[start:stop]
        return torch.cat([class_head(self.model, task.class_names, task.templates) for task in tasks])

    def task_loss(self, batch: dict) -> tuple[Tensor, Tensor | None]:
        task = self.stream.current_task
        head = self.head(*self.head_span(task, task))
        features = self.image_features(self.model, batch["image"], batch["key"])
        logits = self.model.logit_scale.clamp(max=100) * features @ head.T
        return F.cross_entropy(logits, batch["label"]), None

    @torch.no_grad()
    def accuracy_row(self, learned: int, routed: bool = True) -> list[float]:
        """Accuracy on every task's test images once tasks 0..learned are learned (`routed`
        False: no task routers, as before training)."""
        was_training = self.model.training
        self.model.eval()
        if text_tower_trains(self.model):
            self.heads.clear()  # the text tower changed since the last evaluation
        classes = sum(len(task.class_names) for task in self.stream.tasks)
        accuracy = MulticlassAccuracy(num_classes=classes, average="micro").to(self.device)
        row = []
        for target in range(len(self.stream.tasks)):
            set_active_task(self.model, self.router_for(target, learned) if routed else None)
            head = self.head(*self.head_span(target, learned))
            for batch in self.stream.test_loader(target):
                features = self.image_features(self.model, batch["image"].to(self.device), batch["key"])
                accuracy.update((features @ head.T).argmax(-1), batch["label"].to(self.device))
            row.append(float(accuracy.compute()))
            accuracy.reset()
        self.model.train(was_training)
        return row

    # --- the stream, task by task ---------------------------------------------------------
    def on_fit_start(self) -> None:
        self.check_stream()
        if self.record is None:
            tasks = self.stream.tasks
            if self.stream.class_incremental:
                zero_shot = [self.accuracy_row(learned, routed=False) for learned in range(len(tasks))]
            else:
                zero_shot = [self.accuracy_row(0, routed=False)] * len(tasks)
            self.record = ContinualRecord(
                [task.name for task in tasks],
                self.stream.class_incremental,
                self.stream.test_sizes(),
                zero_shot,
            )
            self.write_record()

    def check_stream(self) -> None:
        """Everything the stream protocol needs, checked before anything trains."""
        stream = self.stream
        tasks, epochs = len(stream.tasks), stream.epochs_per_task
        max_epochs = self.trainer.max_epochs
        if max_epochs is None or max_epochs > tasks * epochs:
            raise UserInputError(
                f"trainer.max_epochs={max_epochs} must be at most tasks x epochs_per_task = "
                f"{tasks} x {epochs} = {tasks * epochs} (the stream ends there)"
            )
        reload = self.trainer.reload_dataloaders_every_n_epochs
        if reload < 1 or epochs % reload:
            raise UserInputError(
                f"trainer.reload_dataloaders_every_n_epochs={reload} must divide epochs_per_task={epochs}, so "
                "each task loads its own images (use 1)"
            )
        for name, layer in adapted_layers(self.model):
            capacity = getattr(layer.config, "num_tasks", tasks)
            if capacity < tasks:
                raise UserInputError(
                    f"layer {name!r} has a {layer.config.kind!r} adapter for num_tasks={capacity}, but the "
                    f"stream has {tasks} tasks"
                )

    @property
    def run_folder(self) -> Path:
        return Path(self.trainer.log_dir or self.trainer.default_root_dir)

    def write_record(self) -> None:
        if self.global_rank == 0:  # every process evaluates the same matrix; one writes it
            self.record.write(self.run_folder)

    def on_train_epoch_start(self) -> None:
        epoch = self.trainer.current_epoch
        set_active_task(self.model, self.stream.task_of_epoch(epoch))
        if epoch % self.stream.epochs_per_task == 0:  # a new task starts with a fresh optimizer state
            for optimizer in self.trainer.optimizers:
                optimizer.state.clear()

    def on_train_epoch_end(self) -> None:
        epoch = self.trainer.current_epoch
        if (epoch + 1) % self.stream.epochs_per_task:
            return
        task = self.stream.task_of_epoch(epoch)
        kept = end_task(self.model)
        row = self.accuracy_row(task)
        self.record.add_row(row, kept)
        self.write_record()
        if self.injection.adapted:
            self.export(str(self.run_folder / "tasks" / f"task{task}"), overwrite=True)
        self.log_task_end(task, row, kept)

    def tensorboard_layout(self) -> dict[str, dict[str, list[str]]]:
        return {
            "continual": {
                "accuracy on each task, after each task": [r"continual/accuracy/.+"],
                "mean accuracy over the tasks seen": [r"continual/accuracy_seen$"],
                "ranks, atoms or experts kept": [r"continual/(?!accuracy).+"],
            }
        }

    def log_task_end(self, task: int, row: list[float], kept: dict[str, dict]) -> None:
        for name, accuracy in zip(self.record.tasks, row, strict=True):
            self.log(f"continual/accuracy/{name}", accuracy)
        self.log("continual/accuracy_seen", sum(row[: task + 1]) / (task + 1))
        for method, layers in kept.items():
            if layers:
                self.log(f"continual/{method}", float(sum(map(_count, layers.values()))))
        if isinstance(self.logger, TensorBoardLogger):
            self.logger.experiment.add_figure("continual/accuracy_matrix", matrix_figure(self.record), task)

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        super().on_save_checkpoint(checkpoint)
        checkpoint["continual_record"] = self.record.to_dict() if self.record else None

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        super().on_load_checkpoint(checkpoint)
        saved = checkpoint.get("continual_record")
        self.record = ContinualRecord.from_dict(saved) if saved else None


def _count(kept: int | list[int]) -> int:
    return kept if isinstance(kept, int) else len(kept)
