"""The base LightningModule through real CLI runs: checkpoints, resume, logging, optimiser groups."""

import math
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from lightning_moe.cli import main
from lightning_moe.errors import UserInputError
from lightning_moe.router_losses import RouterLoss
from tests.tiny import REPO, tiny_causal_lm_task
from tests.tolerances import TRAINED_LOSS_RTOL, TRAINED_STATE_RTOL, relative_difference

SMOKE = str(REPO / "configs/smoke/mole_tiny_llama.yaml")
SMALL_RUN = [
    "--data.init_args.train_size=32",
    "--data.init_args.batch_size=8",
    "--trainer.log_every_n_steps=1",
    "--model.init_args.routing_log_every_n_steps=2",
]


def fit(name: str, *extra: str):
    return main(["fit", "--config", SMOKE, *SMALL_RUN, f"--trainer.logger.init_args.name={name}", *extra])


def run_dir(name: str) -> Path:
    (version,) = Path("runs/smoke", name).glob("version_*")
    return version


def test_fit_logs_routing_and_saves_adapter_only_checkpoints(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    fit("run", "--trainer.max_steps=4")
    directory = run_dir("run")

    checkpoint = torch.load(directory / "checkpoints/last.ckpt", weights_only=True)
    keys = list(checkpoint["state_dict"])
    assert keys and all(".adapter." in key for key in keys)
    assert not any("embed_tokens" in key or key.endswith("base_layer.weight") for key in keys)
    assert "base_fingerprint" in checkpoint

    exported = load_file(directory / "adapter/adapter_model.safetensors")
    assert set(exported) == {key.removeprefix("model.").replace(".adapter.", ".") for key in keys}

    events = EventAccumulator(
        str(directory), size_guidance={"images": 0, "histograms": 0, "tensors": 0}
    ).Reload()
    scalars = events.Tags()["scalars"]
    for tag in [
        "train/task_loss",
        "train/balance_loss",
        "routing/entropy",
        "routing/max_load",
        "routing/dead_experts",
    ]:
        assert tag in scalars
    # per-layer detail is in one figure and two histograms, not in scalars per layer
    assert not [tag for tag in scalars if "layers." in tag]
    assert {"routing/layer_entropy", "routing/layer_max_load"} <= set(events.Tags()["histograms"])
    assert "train/expert_load" in events.Tags()["images"]
    # routing is measured every 2nd step (SMALL_RUN) and logged at those steps only, not repeated
    assert [event.step for event in events.Scalars("routing/entropy")] == [0, 2]
    entropy = [event.value for event in events.Scalars("routing/entropy")]
    assert entropy and all(0.0 <= value <= 1.0 for value in entropy)
    max_load = [event.value for event in events.Scalars("routing/max_load")]
    assert all(1.0 <= value <= 4.0 for value in max_load)  # 4 experts: balanced .. one takes all
    # the custom-scalars layout and the config as text
    text_tags = events.Tags()["tensors"]
    assert "custom_scalars__config__" in text_tags and "config/text_summary" in text_tags


EVERY_TWO_STEPS = (
    "--trainer.callbacks=[{class_path: lightning.pytorch.callbacks.ModelCheckpoint, "
    "init_args: {every_n_train_steps: 2, save_top_k: -1}}, {class_path: lightning_moe.callbacks.ExportAdapter}]"
)


@pytest.mark.parametrize("resume_step", [4, 6], ids=["epoch_boundary", "mid_epoch"])
def test_resume_from_checkpoint_continues_exactly(tmp_path, monkeypatch, resume_step):
    # 32 examples / batch 8 = 4 steps per epoch
    monkeypatch.chdir(tmp_path)
    fit("straight", "--trainer.max_steps=8", EVERY_TWO_STEPS)
    (checkpoint,) = (run_dir("straight") / "checkpoints").glob(f"*step={resume_step}.ckpt")
    cli = fit("resumed", "--trainer.max_steps=8", EVERY_TWO_STEPS, f"--ckpt_path={checkpoint}")
    assert cli.trainer.global_step == 8
    straight = load_file(run_dir("straight") / "adapter/adapter_model.safetensors")
    resumed = load_file(run_dir("resumed") / "adapter/adapter_model.safetensors")
    assert straight.keys() == resumed.keys()
    for key in straight:
        torch.testing.assert_close(resumed[key], straight[key], rtol=0, atol=0)
    saved = torch.load(checkpoint, weights_only=True)["state_dict"]
    assert any(
        not torch.equal(saved["model." + k.replace("experts.", "adapter.experts.")], straight[k])
        for k in straight
        if "experts." in k
    )


DATA_INIT_RULES = (
    "--model.init_args.adapters=["
    "{targets: [self_attn.q_proj, self_attn.o_proj], adapter: {kind: lora, rank: 4, init: eva, eva_tau: 0.5, init_batches: 3}}, "
    "{targets: [mlp.up_proj], adapter: {kind: moe, num_experts: 2, rank: 2, init: eva, init_batches: 3}}, "
    "{targets: [mlp.down_proj], adapter: {kind: lora, rank: 4, init: lora_ga, init_batches: 2}}, "
    "{targets: [lm_head], adapter: {kind: dylora, rank: 4}}]"
)


def test_resume_with_data_driven_inits_and_dylora_continues_exactly(tmp_path, monkeypatch):
    """EVA (ranks redistributed), EVA experts and LoRA-GA: the resumed run recomputes the same
    init from the same first batches, checks it against the checkpoint's rules, then continues;
    DyLoRA's per-step ranks come out the same too."""
    monkeypatch.chdir(tmp_path)
    fit("straight", "--trainer.max_steps=6", EVERY_TWO_STEPS, DATA_INIT_RULES)
    (checkpoint,) = (run_dir("straight") / "checkpoints").glob("*step=2.ckpt")
    fit("resumed", "--trainer.max_steps=6", EVERY_TWO_STEPS, DATA_INIT_RULES, f"--ckpt_path={checkpoint}")
    straight = load_file(run_dir("straight") / "adapter/adapter_model.safetensors")
    resumed = load_file(run_dir("resumed") / "adapter/adapter_model.safetensors")
    assert straight.keys() == resumed.keys()
    for key in straight:
        torch.testing.assert_close(resumed[key], straight[key], rtol=0, atol=0)
    ranks = {key: value.shape[0] for key, value in straight.items() if key.endswith("attn.q_proj.lora_A")}
    ranks |= {key: value.shape[0] for key, value in straight.items() if key.endswith("attn.o_proj.lora_A")}
    assert sum(ranks.values()) <= 4 * 4 and set(ranks.values()) != {4}  # redistributed (some may be dropped)
    assert any(key.endswith("down_proj.pissa_A0") for key in straight)  # LoRA-GA's subtracted start


def test_existing_adapter_export_is_refused_before_training(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    export = [
        "--trainer.callbacks=lightning_moe.callbacks.ExportAdapter",
        "--trainer.callbacks.dirpath=shared/adapter",
    ]
    fit("first", "--trainer.max_steps=2", *export)
    weights = Path("shared/adapter/adapter_model.safetensors")
    before = weights.read_bytes()
    with pytest.raises(SystemExit, match=r"shared/adapter already holds an adapter"):
        fit("second", "--trainer.max_steps=4", *export)
    assert weights.read_bytes() == before
    assert not Path("runs/smoke/second").exists()  # the refused run left nothing behind


def test_a_folder_that_holds_a_run_is_refused(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    fit("run", "--trainer.max_steps=2", "--trainer.logger.init_args.version=same")
    folder = Path("runs/smoke/run/same")
    before = {path: path.read_bytes() for path in folder.rglob("*") if path.is_file()}
    with pytest.raises(SystemExit, match=r"run/same already holds a run .*--ckpt_path=.*last.ckpt"):
        fit("run", "--trainer.max_steps=4", "--trainer.logger.init_args.version=same")
    assert {path: path.read_bytes() for path in folder.rglob("*") if path.is_file()} == before


def test_checkpoint_of_another_base_is_refused_on_resume(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    fit("base0", "--trainer.max_steps=2")
    last = run_dir("base0") / "checkpoints/last.ckpt"
    with pytest.raises(SystemExit, match="different base model"):
        fit("base1", "--trainer.max_steps=4", "--model.init_args.model_seed=1", f"--ckpt_path={last}")


def test_configure_model_is_idempotent(tiny_llama_config):
    task = tiny_causal_lm_task(tiny_llama_config)
    model = task.model
    task.configure_model()
    assert task.model is model
    assert not any(name.endswith("base_layer.base_layer") for name, _ in model.named_modules())


def test_parameter_groups_give_routers_their_own_learning_rate(tiny_llama_config):
    task = tiny_causal_lm_task(tiny_llama_config, router_lr=0.5)
    optimizer = task.configure_optimizers()
    by_name = {group["name"]: group for group in optimizer.param_groups}
    assert by_name["routers"]["lr"] == 0.5
    assert by_name["adapters"]["lr"] == 2e-4
    router_params = {id(p) for p in by_name["routers"]["params"]}
    expected = {id(p) for n, p in task.named_parameters() if n.endswith("router.gate.weight")}
    assert router_params == expected and len(expected) == 2
    trainable = {id(p) for p in task.parameters() if p.requires_grad}
    assert trainable == {id(p) for group in optimizer.param_groups for p in group["params"]}


def test_router_losses_are_added_with_their_coefficients(tiny_llama_config):
    batch = {
        "input_ids": torch.randint(0, 259, (2, 6)),
        "attention_mask": torch.tensor([[1] * 6, [1] * 4 + [0] * 2]),
    }
    batch["labels"] = batch["input_ids"]
    plain = tiny_causal_lm_task(tiny_llama_config, router_loss=RouterLoss(balance_coef=0.0, z_coef=0.0))
    weighted = tiny_causal_lm_task(tiny_llama_config, router_loss=RouterLoss(balance_coef=0.5, z_coef=0.25))
    weighted.load_state_dict(plain.state_dict())
    from lightning_moe.adapters import load_balance_loss, router_z_loss, routing_collector

    with routing_collector(weighted.model).capture() as records:
        weighted.task_loss(batch)
    expected = (
        plain._step(batch, "train")
        + 0.5 * load_balance_loss(records, batch["attention_mask"])
        + 0.25 * router_z_loss(records, batch["attention_mask"])
    )
    torch.testing.assert_close(weighted._step(batch, "train"), expected)


def test_state_dict_is_trainable_state_and_loading_a_mismatch_fails(tiny_llama_config):
    task = tiny_causal_lm_task(tiny_llama_config)
    state = task.state_dict()
    assert all(".adapter." in key for key in state)
    del state[next(iter(state))]
    with pytest.raises(UserInputError, match="missing"):
        task.load_state_dict(state)


@pytest.mark.slow
def test_compiled_model_trains_like_eager(tmp_path, monkeypatch):
    """`compile: true` compiles the adapted model in configure_model; training equals eager."""
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path / "inductor"))
    monkeypatch.chdir(tmp_path)
    # no validation: it would compile the eval graphs too, the most expensive part of this test
    # and one shape for every batch, so one compilation serves every step
    steps = ["--trainer.max_steps=3", "--trainer.num_sanity_val_steps=0", "--trainer.limit_val_batches=0"]
    steps.append("--data.init_args.pad_to_multiple_of=32")
    fit("eager", *steps)
    cli = fit("compiled", *steps, "--model.init_args.compile=true")
    assert cli.model.model._compiled_call_impl is not None
    # compared as trained runs (see TRAINED_STATE_RTOL), in fp32: float64 would not help, as
    # transformers' Llama computes its norms, rotary embedding and loss in fp32 whatever the dtype
    losses = {name: train_losses(name) for name in ("eager", "compiled")}
    assert len(losses["eager"]) == 3
    assert losses["compiled"] == pytest.approx(losses["eager"], rel=TRAINED_LOSS_RTOL)
    eager = load_file(run_dir("eager") / "adapter/adapter_model.safetensors")
    compiled = load_file(run_dir("compiled") / "adapter/adapter_model.safetensors")
    assert relative_difference(compiled, eager) < TRAINED_STATE_RTOL


def train_losses(name: str) -> list[float]:
    """The training loss logged at every step of run `name`."""
    events = EventAccumulator(str(run_dir(name)), size_guidance={"scalars": 0}).Reload()
    return [event.value for event in events.Scalars("train/loss")]


def test_dylora_sweeps_ranks_and_truncates_through_the_cli(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    sweep = (
        "--trainer.callbacks=[{class_path: lightning_moe.callbacks.ExportAdapter}, "
        "{class_path: lightning_moe.nested_ranks.RankSweep, init_args: {max_batches: 1}}]"
    )
    rules = (
        "--model.init_args.adapters=[{targets: [lm_head, mlp.down_proj], adapter: {kind: dylora, rank: 4}}]"
    )
    fit("dylora", "--trainer.max_steps=4", "--trainer.val_check_interval=4", sweep, rules)
    directory = run_dir("dylora")
    events = EventAccumulator(str(directory)).Reload()
    curve = events.Scalars("dylora/val_loss_by_rank/step_4")
    assert [event.step for event in curve] == [1, 2, 4]
    assert all(math.isfinite(event.value) for event in curve)
    assert {event.value for event in events.Scalars("train/dylora_rank")} <= {1.0, 2.0, 3.0, 4.0}
    main(["truncate", str(directory / "adapter"), "--rank", "2", "--output", "r2"])
    assert load_file("r2/adapter_model.safetensors")["lm_head.lora_A"].shape[0] == 2
    with pytest.raises(SystemExit) as exit_info:
        main(["truncate", str(directory / "adapter"), "--rank", "5", "--output", "r5"])
    assert str(exit_info.value.code).startswith("error: rank 5 is outside the ranks 1..4")  # printed, exit 1


@pytest.mark.parametrize(
    "optimizer",
    [
        "--model.init_args.optimizer=lightning_moe.lora_optimizers.LoraPro",
        "--model.init_args.optimizer={class_path: lightning_moe.lora_optimizers.ALLoRA, init_args: {lr: 0.01}}",
    ],
    ids=["lora_pro", "allora"],
)
def test_resume_with_lora_optimizers_continues_exactly(tmp_path, monkeypatch, optimizer):
    """Their state (LoRA-Pro: full-size moments per layer and expert) goes through checkpoints."""
    monkeypatch.chdir(tmp_path)
    rules = (
        "--model.init_args.adapters=[{targets: [mlp.up_proj], adapter: {kind: moe, num_experts: 2, rank: 2, alpha: 2}}, "
        "{targets: [lm_head], adapter: {kind: lora, rank: 4, alpha: 4}}]"
    )
    fit("straight", "--trainer.max_steps=6", EVERY_TWO_STEPS, rules, optimizer)
    (checkpoint,) = (run_dir("straight") / "checkpoints").glob("*step=4.ckpt")
    fit("resumed", "--trainer.max_steps=6", EVERY_TWO_STEPS, rules, optimizer, f"--ckpt_path={checkpoint}")
    straight = load_file(run_dir("straight") / "adapter/adapter_model.safetensors")
    resumed = load_file(run_dir("resumed") / "adapter/adapter_model.safetensors")
    for key in straight:
        torch.testing.assert_close(resumed[key], straight[key], rtol=0, atol=0)
    state = torch.load(checkpoint, weights_only=True)["optimizer_states"][0]["state"]
    assert any(value["exp_avg"].shape == (2, 128, 64) for value in state.values()) == ("LoraPro" in optimizer)
