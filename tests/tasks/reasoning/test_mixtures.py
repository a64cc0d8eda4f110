"""X-LoRA and MeteoRA through the real CLI on a tiny Llama, with tiny expert LoRAs on disk."""

import json
from pathlib import Path

import pytest
import torch

from lightning_moe.adapters import LoraMixtureAdapter, adapted_layers, routing_collector
from tests.tiny import REPO

CONFIGS = REPO / "configs/mixtures"
TASKS = ["chain_sum", "letter_counting", "count_bits", "leg_counting"]


@pytest.fixture
def run(run_config):
    """run(config name, subcommand, *args): the CLI on a mixture config with a tiny model and experts."""
    return lambda name, subcommand, *args: run_config(CONFIGS / name, subcommand, *args)


def test_meteora_gates_learn_each_task_expert_from_the_label_loss(run):
    cli = run(
        "meteora_smollm2.yaml",
        "fit",
        "--trainer.max_steps=40",
        "--trainer.logger=false",
        "--trainer.callbacks=[]",
        "--model.init_args.router_loss.label_coef=1.0",
        "--model.init_args.optimizer.init_args.lr=0.03",
        "--data.init_args.train_size=40",
    )
    task, datamodule = cli.model, cli.datamodule
    # chance is ln(4) = 1.39 for the loss and 25% for the accuracy below
    assert cli.trainer.callback_metrics["train/gate_label_loss"] < 1.2
    batch = datamodule._loader("test").collate_fn(datamodule.splits["test"])
    with torch.no_grad(), routing_collector(task.model).capture() as records:
        task.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
    labels = torch.tensor([TASKS.index(domain) for domain in batch["domain"]])
    real = batch["attention_mask"].bool()
    accuracy = {
        name: (record.logits.argmax(-1) == labels[:, None])[real].float().mean()
        for name, record in records.items()
    }
    # a gate reads its layer's input: the first layers see little context (the tiny model's first
    # q_proj sees only the current byte), so gates after attention separate the tasks best
    assert sum(accuracy.values()) / len(accuracy) > 0.4
    assert max(accuracy.values()) > 0.6


def test_label_loss_without_expert_tasks_fails_before_training(run, tmp_path):
    with pytest.raises(SystemExit) as exit_info:
        run("xlora_smollm2.yaml", "fit", "--model.init_args.router_loss.label_coef=0.5")
    assert "no adapter names its experts' tasks; set `expert_tasks`" in str(exit_info.value.code)
    assert not list(tmp_path.rglob("*.ckpt"))


def test_xlora_checkpoint_resumes_and_refuses_a_changed_expert(run, tmp_path, tiny_experts):
    checkpoints = "--trainer.callbacks+=lightning.pytorch.callbacks.ModelCheckpoint"
    first = run("xlora_smollm2.yaml", "fit", "--trainer.max_steps=2", checkpoints)
    (checkpoint,) = tmp_path.rglob("*.ckpt")
    state = torch.load(checkpoint, weights_only=True, map_location="cpu")
    assert state["state_dict"] and all(".adapter.gate." in key for key in state["state_dict"])
    assert len(state["expert_sha256"]) == 4

    adapter = next((tmp_path / "runs/mixture_results/xlora").rglob("adapter/adapter_config.json")).parent
    predicted = run("xlora_smollm2.yaml", "predict", f"--model.init_args.adapter_path={adapter}")
    gates = {n: p for n, p in first.model.named_parameters() if p.requires_grad}
    for name, parameter in predicted.model.named_parameters():
        if name in gates:
            assert torch.equal(parameter, gates[name]), name

    resumed = run("xlora_smollm2.yaml", "fit", "--trainer.max_steps=3", f"--ckpt_path={checkpoint}")
    assert resumed.trainer.global_step == 3
    assert all(isinstance(layer.adapter, LoraMixtureAdapter) for _, layer in adapted_layers(resumed.model))

    tiny_experts(["runs/mixture_results/experts/count_bits/adapter_changed"])  # other weights, then swap in
    count_bits = Path("runs/mixture_results/experts/count_bits/adapter")
    for name in ("adapter_model.safetensors", "adapter_config.json"):
        (count_bits.parent / "adapter_changed" / name).replace(count_bits / name)
    with pytest.raises(SystemExit) as exit_info:
        run("xlora_smollm2.yaml", "fit", "--trainer.max_steps=4", f"--ckpt_path={checkpoint}")
    assert "count_bits/adapter with sha256" in str(exit_info.value.code)
    with pytest.raises(SystemExit) as exit_info:
        run("xlora_smollm2.yaml", "predict", f"--model.init_args.adapter_path={adapter}")
    assert "count_bits/adapter changed since this mixture was saved" in str(exit_info.value.code)


def test_gates_train_with_the_router_learning_rate(run):
    cli = run("xlora_smollm2.yaml", "fit", "--trainer.max_steps=1", "--model.init_args.router_lr=0.5")
    (optimizer,) = cli.trainer.optimizers
    assert [group["name"] for group in optimizer.param_groups] == ["routers"]
    gates = {id(p) for n, p in cli.model.named_parameters() if ".adapter.gate." in n}
    assert len(gates) == 2 * 7 * 2  # weight and bias of a linear gate on each of 14 layers
    assert {id(p) for p in optimizer.param_groups[0]["params"]} == gates
    assert optimizer.param_groups[0]["lr"] == 0.5


def test_label_loss_needs_one_task_list_for_all_mixtures(run):
    experts = [f"runs/mixture_results/experts/{task}/adapter" for task in TASKS]
    rules = [
        {"targets": targets, "adapter": {"kind": "meteora", "experts": experts, "expert_tasks": tasks}}
        for targets, tasks in [
            (["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj"], TASKS),
            (["mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"], TASKS[::-1]),
        ]
    ]
    with pytest.raises(SystemExit) as exit_info:
        run("meteora_smollm2.yaml", "fit", f"--model.init_args.adapters={json.dumps(rules)}")
    assert "needs one task per expert shared by all mixtures" in str(exit_info.value.code)
