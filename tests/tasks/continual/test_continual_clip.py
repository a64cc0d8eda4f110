"""The continual CLIP task over a stream, run as a user runs it (`fit` with the method configs on a
tiny CLIP of the packaged layout): the accuracy matrix against a direct evaluation of the
per-task adapters, class-incremental zeros, MoE-Adapters routing, and bad input before training."""

import copy
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from lightning_moe.adapters import load_adapter_weights
from lightning_moe.adapters.files import read_safetensors
from lightning_moe.cli import main
from lightning_moe.data.continual_streams import TaskIncrementalStream
from lightning_moe.tasks.continual.clip_models import zero_shot_head
from tests.tiny import REPO, overlay, write_tiny_minilm

CONFIGS = REPO / "configs" / "continual"
TASKS = ["digits", "textile"]


def fit_stream(folder: Path, method: str, *extra: str):
    write_tiny_minilm()
    return main(
        [
            "fit",
            "--config",
            str(CONFIGS / "embedded_stream.yaml"),
            "--config",
            str(CONFIGS / f"{method}.yaml"),
            overlay("continual_stream"),
            f"--data.init_args.tasks={json.dumps(TASKS)}",
            "--data.init_args.train_size=16",
            "--data.init_args.test_size=12",
            "--trainer.max_epochs=2",
            f"--trainer.logger.init_args.save_dir={folder}",
            *extra,
        ]
    )


@torch.no_grad()
def reference_accuracy(model, adapter_folder: Path | None, stream: TaskIncrementalStream) -> list[tuple]:
    """A copy of the trained CLIP with the saved adapters (None: every update zeroed, the
    zero-shot CLIP), zero-shot heads, one test image at a time. Per task: (accuracy, share of
    near ties), since a random tiny CLIP's top two logits can differ by float noise alone."""
    model = copy.deepcopy(model).eval()
    if adapter_folder is None:
        for name, parameter in model.named_parameters():
            if "lora_B" in name:
                parameter.zero_()
    else:
        load_adapter_weights(model, adapter_folder)
    row = []
    for index, task in enumerate(stream.tasks):
        head = zero_shot_head(model, task.class_names, task.templates)
        test = stream.split(index, "test")
        logits = torch.cat([model.encode_images(test[i]["image"][None]) @ head.T for i in range(len(test))])
        labels = torch.tensor([test[i]["label"] for i in range(len(test))])
        top2 = logits.topk(2).values
        ties = (top2[:, 0] - top2[:, 1] < 1e-5).float().mean().item()
        row.append(((logits.argmax(-1) == labels).float().mean().item(), ties))
    return row


def assert_row_matches(row: list[float], reference: list[tuple]) -> None:
    for accuracy, (expected, ties) in zip(row, reference, strict=True):
        assert abs(accuracy - expected) <= ties + 1e-6


def test_lora_matrix_equals_evaluating_each_task_adapter(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    cli = fit_stream(tmp_path / "runs", "lora")
    run, model, stream = Path(cli.trainer.log_dir), cli.model.model, cli.datamodule
    record = json.loads((run / "accuracy_matrix.json").read_text())
    assert record["tasks"] == TASKS and len(record["matrix"]) == 2 and record["summary"] is not None
    assert_row_matches(record["zero_shot"], reference_accuracy(model, None, stream))
    for task in range(2):
        assert_row_matches(
            record["matrix"][task], reference_accuracy(model, run / "tasks" / f"task{task}", stream)
        )
    assert np.array_equal(np.load(run / "accuracy_matrix.npy"), np.array(record["matrix"]))
    first, second = (
        read_safetensors(run / "tasks" / f"task{t}" / "adapter_model.safetensors") for t in range(2)
    )
    assert all(
        first[key].abs().sum() > 0 and not torch.equal(first[key], second[key])
        for key in first
        if "lora_B" in key
    )
    assert any(path.name.startswith("events.out.tfevents") for path in run.iterdir())


def test_codyra_task_checkpoints_keep_the_merged_ranks(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    cli = fit_stream(tmp_path / "runs", "codyra")
    run = Path(cli.trainer.log_dir)
    record = json.loads((run / "accuracy_matrix.json").read_text())
    kept = record["kept"][0]["codyra_ranks_kept"]
    assert kept and all(0 <= ranks <= 8 for ranks in kept.values())
    assert_row_matches(
        record["matrix"][0], reference_accuracy(cli.model.model, run / "tasks" / "task0", cli.datamodule)
    )


def test_moe_adapters_answer_untrained_tasks_with_the_frozen_clip(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    cli = fit_stream(tmp_path / "runs", "moe_adapters")
    record = json.loads((Path(cli.trainer.log_dir) / "accuracy_matrix.json").read_text())
    assert record["matrix"][0][1] == record["zero_shot"][1]  # no router for task 1 yet
    frozen = [len(experts) for experts in record["kept"][-1]["moe_experts_frozen"].values()]
    assert frozen and set(frozen) == {1}  # one expert per layer per task
    adapters = [module.adapter for module in cli.model.model.modules() if hasattr(module, "adapter")]
    assert all(int(adapter.frozen_experts.sum()) == 2 for adapter in adapters)


def test_class_incremental_future_classes_are_real_zeros(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    write_tiny_minilm()
    splits = [["0", "1", "2", "3", "4"], ["5", "6", "7", "8", "9"]]
    cli = fit_stream(
        tmp_path / "runs",
        "mora",
        "--data=lightning_moe.data.continual_streams.ClassIncrementalStream",
        "--data.init_args.dataset=digits",
        f"--data.init_args.class_splits={json.dumps(splits)}",
    )
    record = json.loads((Path(cli.trainer.log_dir) / "accuracy_matrix.json").read_text())
    assert record["class_incremental"] and record["matrix"][0][1] == 0.0
    assert record["zero_shot_matrix"][0][1] == 0.0  # step 1's classes are not in step 0's head
    assert set(record["summary"]) == {"avg_incremental", "last_incremental", "bwt", "forgetting"}
    atoms = record["kept"][0]["mora_atoms_kept"]
    assert atoms and all(0 <= count <= 4 for count in atoms.values())


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("--trainer.max_epochs=3", "max_epochs=3 must be at most tasks x epochs_per_task"),
        ("--trainer.reload_dataloaders_every_n_epochs=0", "reload_dataloaders_every_n_epochs=0"),
        (
            "--data.init_args.tasks=[digits, textile, mnist-5k, fashion-mnist, digits2]",
            "unknown dataset 'digits2'",
        ),
        (
            "--data.init_args.tasks=[digits, {name: cars, root: /no/cars}]",
            "dataset root /no/cars of task 'cars' does not exist",
        ),
    ],
)
def test_bad_stream_settings_stop_before_training(tmp_path, monkeypatch, override, message):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as exit_info:
        fit_stream(tmp_path / "runs", "lora", override)
    assert message in str(exit_info.value.code)
    assert not list(tmp_path.rglob("accuracy_matrix.json"))


def test_too_few_task_slots_stop_before_training(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as exit_info:
        fit_stream(
            tmp_path / "runs",
            "mora",
            "--model.init_args.adapters=[{targets: [head.proj], adapter: {kind: mora, rank: 2, num_tasks: 1, top_k: 1}}]",
        )
    assert "num_tasks=1, but the stream has 2 tasks" in str(exit_info.value.code)


def test_a_class_split_that_misses_classes_stops_before_training(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as exit_info:
        fit_stream(
            tmp_path / "runs",
            "lora",
            "--data=lightning_moe.data.continual_streams.ClassIncrementalStream",
            "--data.init_args.dataset=digits",
            '--data.init_args.class_splits=[["0", "1"], ["2", "3"]]',
        )
    assert "missing ['4', '5', '6', '7', '8', '9']" in str(exit_info.value.code)
    assert not list(tmp_path.rglob("accuracy_matrix.json"))


def test_the_task_gets_the_stream_and_its_image_size_from_the_data(tmp_path, monkeypatch):
    """Linked at parse time: one value, so the two can never disagree."""
    monkeypatch.chdir(tmp_path)
    write_tiny_minilm()
    configs = ["--config", str(CONFIGS / "embedded_stream.yaml"), "--config", str(CONFIGS / "lora.yaml")]
    cli = main([*configs, overlay("continual_stream"), "--data.init_args.image_size=24"], run=False)
    assert cli.model.image_size == cli.datamodule.image_size == 24
    assert cli.model.stream is cli.datamodule
