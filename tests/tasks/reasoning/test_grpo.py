"""GRPOTask on a tiny random Llama with the byte tokenizer: rewards from real verifiers, the
reference policy, micro-batching, logging, resume and the errors, through the real CLI."""

import copy

import pytest
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from lightning_moe.adapters import AdapterRule, adapters_disabled, inject, merge_adapters
from lightning_moe.adapters.adapter_folder import save_adapter
from lightning_moe.adapters.files import read_safetensors
from lightning_moe.data.verified_prompts import VerifiedPrompts
from lightning_moe.errors import UserInputError
from lightning_moe.tasks.reasoning import GRPOTask
from lightning_moe.tasks.reasoning import rewards as rewards_module
from lightning_moe.tasks.reasoning.rewards import final_answer, score_completions
from tests.tiny import LLAMA_LINEARS, REPO, TINY_REASONING_LLAMA, build_llama, randomize_adapters

CONFIG = REPO / "configs/rl/grpo_smollm2.yaml"


def chain_sum_verifier():
    data = VerifiedPrompts(tokenizer="bytes", tasks=["chain_sum"], train_size=4, val_size=2, test_size=2)
    return data.verifier()


def test_rewards_come_from_the_tasks_own_verifier():
    completions = ["so\n#### 12", "#### 13", "twelve", "#### 1,2\n"]
    entries = [{"answer": "12"}] * 4
    rewards = score_completions(completions, ["chain_sum"] * 4, entries, ["p"] * 4, chain_sum_verifier(), 0.5)
    assert rewards.correct.tolist() == [1.0, 0.0, 0.0, 1.0]  # chain_sum's own reward strips commas
    assert rewards.formatted.tolist() == [1.0, 1.0, 0.0, 1.0]
    assert rewards.total.tolist() == [1.5, 0.5, 0.0, 1.5]
    assert final_answer("a\n#### x\n#### 7 apples\nmore") == "7 apples" and final_answer("#### ") is None
    # the last number instead, for a model that does not write the format yet
    last = score_completions(
        completions, ["chain_sum"] * 4, entries, ["p"] * 4, chain_sum_verifier(), 0.5, "last_number"
    )
    assert last.correct.tolist() == [1.0, 0.0, 0.0, 1.0] and last.formatted.tolist() == [1.0, 1.0, 0.0, 1.0]
    assert score_completions(["it is 12."], ["chain_sum"], entries[:1], ["p"], chain_sum_verifier(), 0.5,
                             "last_number").total.tolist() == [1.0]  # fmt: skip


@pytest.mark.parametrize(
    ("verifier", "message"),
    [
        (lambda task, answer, entry: 1 / 0, "failed on sample 1 .*ZeroDivisionError"),
        (lambda task, answer, entry: float("nan"), "returned nan; expected a finite number"),
        (lambda task, answer, entry: 2.0, "returned 2.0; expected a number in \\[0, 1\\]"),
    ],
    ids=["raises", "nan", "out of range"],
)
def test_a_bad_reward_names_the_task_and_the_sample(verifier, message):
    def flaky(task, answer, entry):
        return 0.0 if answer == "1" else verifier(task, answer, entry)

    with pytest.raises(UserInputError, match=f"verifier of task 'chain_sum'.*{message}"):
        score_completions(["#### 1", "#### 2"], ["chain_sum"] * 2, [{}] * 2, ["p"] * 2, flaky, 0.0)


def test_adapters_switched_off_are_the_base_model_bit_for_bit():
    base = build_llama()
    model = copy.deepcopy(base)
    inject(
        model,
        [
            AdapterRule(["mlp.up_proj"], {"kind": "moe", "num_experts": 4, "top_k": 2}),
            AdapterRule(["self_attn.q_proj"], {"kind": "lora", "rank": 4, "init": "pissa"}),
            AdapterRule(["self_attn.v_proj"], {"kind": "lora", "rank": 4}),
        ],
    )
    randomize_adapters(model)
    ids = torch.randint(0, 64, (2, 7))
    with torch.no_grad():
        expected, adapted = base(input_ids=ids).logits, model(input_ids=ids).logits
        with adapters_disabled(model):
            off = model(input_ids=ids).logits
        again = model(input_ids=ids).logits
    assert torch.equal(off, expected) and not torch.equal(adapted, expected)
    assert torch.equal(again, adapted)  # switched back on afterwards
    plain = copy.deepcopy(base)
    inject(plain, [AdapterRule(["self_attn.v_proj"], {"kind": "lora", "rank": 4})])
    merge_adapters(plain)
    with pytest.raises(Exception, match="while they are merged"), adapters_disabled(plain):
        pass


def tiny_task(**options) -> GRPOTask:
    data = VerifiedPrompts(tokenizer="bytes", tasks=["chain_sum"], train_size=4, val_size=2, test_size=2)
    options.setdefault("adapters", [AdapterRule(LLAMA_LINEARS, {"kind": "lora", "rank": 4})])
    task = GRPOTask(
        data=data,
        tokenizer="bytes",
        model_config={"model_type": "llama", **TINY_REASONING_LLAMA, "vocab_size": 259},
        dtype="float64",
        **options,
    )
    task.configure_model()
    if task.adapter_path is None:
        randomize_adapters(task.model)  # a saved adapter keeps what it learnt
    return task


def fake_rollout(task: GRPOTask, completions: int = 6, prompt: int = 5, length: int = 4) -> dict:
    generator = torch.Generator().manual_seed(0)
    prompt_mask = torch.ones(completions, prompt, dtype=torch.long)
    prompt_mask[::2, :2] = 0  # left padding
    completion_mask = torch.ones(completions, length, dtype=torch.long)
    completion_mask[1::3, 2:] = 0
    ids = torch.randint(3, 250, (completions, prompt + length), generator=generator)
    attention = torch.cat([prompt_mask, completion_mask], 1)
    rollout = {
        "input_ids": ids,
        "attention_mask": attention,
        "position_ids": (attention.cumsum(1) - 1).clamp(min=0),
        "completion": ids[:, prompt:],
        "completion_mask": completion_mask,
        "advantages": torch.randn(completions, generator=generator, dtype=torch.float64),
        "domain": ["chain_sum"] * completions,
    }
    rollout["old_log_probs"] = task.log_probs_of(rollout).detach() + 0.1  # ratios away from 1
    return rollout


def summed_gradient(task: GRPOTask, rollout: dict) -> dict[str, torch.Tensor]:
    task.model.zero_grad()
    for chunk in task.chunks(rollout):
        terms, _ = task.loss_terms(chunk)
        (chunk["share"] * sum(c * v for c, v in terms.values())).backward()
    return {n: p.grad.clone() for n, p in task.model.named_parameters() if p.requires_grad}


def test_micro_batches_give_the_whole_batch_gradient():
    whole_task = tiny_task()
    rollout = fake_rollout(whole_task)
    whole = summed_gradient(whole_task, rollout)
    whole_task.micro_batch_size = 4  # chunks of 4 and 2
    chunked = summed_gradient(whole_task, rollout)
    assert all(torch.allclose(chunked[n], whole[n], rtol=1e-10, atol=1e-14) for n in whole)
    assert any(g.abs().max() > 0 for g in whole.values())


def test_a_policy_gradient_step_raises_the_rewarded_completion():
    task = tiny_task()
    rollout = fake_rollout(task)
    # one group, two distinct completions of the same prompt: the rewarded one in the even rows
    for key in ("input_ids", "attention_mask", "position_ids", "completion", "completion_mask"):
        rollout[key][0::2], rollout[key][1::2] = rollout[key][0], rollout[key][1]
    rewarded = torch.arange(6) % 2 == 0
    rollout["advantages"] = torch.where(rewarded, 1.0, -1.0).double()
    rollout["old_log_probs"] = task.log_probs_of(rollout).detach()  # on-policy: every ratio is 1

    def sequence_log_probs() -> torch.Tensor:
        with torch.no_grad():
            return (task.log_probs_of(rollout) * rollout["completion_mask"]).sum(1)

    before = sequence_log_probs()
    summed_gradient(task, rollout)
    torch.optim.SGD([p for p in task.model.parameters() if p.requires_grad], lr=0.1).step()
    change = sequence_log_probs() - before
    assert (change[rewarded] > 0).all() and (change[~rewarded] < 0).all()


def test_the_reference_log_probs_are_the_base_models():
    task = tiny_task()
    rollout = fake_rollout(task)
    with adapters_disabled(task.model):
        reference = task.log_probs_of(rollout)
    adapted, task.model = task.model, task.build_model()  # the same base (model_seed), no adapters
    base = task.log_probs_of(rollout)
    task.model = adapted
    assert torch.equal(reference, base)
    assert not torch.allclose(reference, task.log_probs_of(rollout))


def test_a_run_from_a_saved_adapter_trains_it_against_the_base(tmp_path):
    sft = tiny_task()
    folder = save_adapter(sft.model, sft.adapter_rules, tmp_path / "sft")
    rollout = fake_rollout(sft)
    task = tiny_task(adapter_path=str(folder), adapters=None)
    assert torch.equal(task.log_probs_of(rollout), sft.log_probs_of(rollout))  # starts where SFT ended
    with adapters_disabled(task.model):
        reference = task.log_probs_of(rollout)
    adapted, task.model = task.model, task.build_model()  # the same base (model_seed), no adapters
    assert torch.equal(reference, task.log_probs_of(rollout))  # the reference is the base, not the SFT
    task.model = adapted
    gradients = summed_gradient(task, rollout)
    assert gradients and all(g.abs().max() > 0 for g in gradients.values())  # the loaded adapter trains


@pytest.mark.parametrize(
    ("option", "message"),
    [
        ({"group_size": 1}, "group_size=1; expected at least 2"),
        ({"epsilon": 1.5}, "epsilon=1.5; expected in \\(0, 1\\)"),
    ],
)
def test_bad_settings_are_refused(option, message):
    with pytest.raises(UserInputError, match=message):
        GRPOTask(tokenizer="bytes", model_config={}, **option)


def test_problem_files_have_no_verifier(tmp_path):
    path = tmp_path / "train.jsonl"
    path.write_text('{"question": "1+1", "answer": "#### 2"}\n')
    with pytest.raises(UserInputError, match="train_file=.*has none"):
        VerifiedPrompts(tokenizer="bytes", train_file=str(path))


# --- through the CLI ---------------------------------------------------------------------------
@pytest.fixture
def varied_rewards(monkeypatch):
    """The tiny random model never writes '#### ': score each completion's share of digits
    instead, through the task's real reward path, so that groups differ (the reference answers
    of the check before training still get 1)."""

    def digits(task, answer, entry):
        return 1.0 if answer.startswith("#### ") else sum(c.isdigit() for c in answer) / max(len(answer), 1)

    monkeypatch.setattr(rewards_module, "final_answer", lambda completion: completion)
    monkeypatch.setattr(VerifiedPrompts, "verifier", lambda self: digits)


def test_fit_logs_the_rollout_and_resumes_exactly(run_config, varied_rewards, tmp_path):
    arguments = [
        "--trainer.max_steps=4",
        "--trainer.val_check_interval=2",  # batches: two rollouts, four optimizer steps
        "--trainer.callbacks+=lightning.pytorch.callbacks.ModelCheckpoint",
        "--trainer.callbacks.dirpath=checkpoints",
        "--trainer.callbacks.every_n_train_steps=2",
        "--trainer.callbacks.save_top_k=-1",
        "--model.init_args.beta=0.1",
        "--model.init_args.answer_extraction=marked",  # the rewards of `varied_rewards`
        "--model.init_args.inner_updates=2",
        "--model.init_args.micro_batch_size=3",
        "--model.init_args.completions_log_every_n_steps=2",
        "--trainer.logger.init_args.version=straight",
    ]
    cli = run_config(CONFIG, "fit", *arguments)
    folder = tmp_path / "runs/rl/grpo_smollm2"
    events = EventAccumulator(str(folder / "straight")).Reload()
    scalars = events.Tags()["scalars"]
    for tag in ["reward", "reward_std", "accuracy", "format_rate", "completion_length", "kl", "clip_fraction",
                "entropy", "equal_reward_groups", "task_loss", "loss"]:  # fmt: skip
        assert f"train/{tag}" in scalars, tag
    assert "val/verifier_score" in scalars
    # inner_updates = 2: two optimizer steps per rollout, one logged row per rollout (Lightning's
    # x-axis under manual optimisation counts batches)
    assert [e.step for e in events.Scalars("train/reward")] == [0, 1]
    assert any(e.value > 0 for e in events.Scalars("train/kl"))  # the second update moved off the reference
    assert "train/completions/text_summary" in events.Tags()["tensors"]
    assert cli.trainer.global_step == 4
    straight = read_safetensors(folder / "straight/adapter/adapter_model.safetensors")

    resumed_arguments = [a for a in arguments if "version" not in a]
    run_config(
        CONFIG, "fit", *resumed_arguments, "--trainer.logger.init_args.version=resumed",
        f"--ckpt_path={tmp_path / 'checkpoints/epoch=0-step=2.ckpt'}",
    )  # fmt: skip
    resumed = read_safetensors(folder / "resumed/adapter/adapter_model.safetensors")
    assert resumed.keys() == straight.keys()
    for key in straight:
        assert torch.equal(resumed[key], straight[key]), key


def test_a_failing_verifier_stops_the_run_with_one_line(run_config, monkeypatch, tmp_path):
    def broken(self):
        return lambda task, answer, entry: {}["metadata"]

    monkeypatch.setattr(VerifiedPrompts, "verifier", broken)
    with pytest.raises(SystemExit) as stop:
        run_config(CONFIG, "fit", "--trainer.max_steps=1")
    message = str(stop.value.code)
    assert message.startswith("error: the verifier of task 'chain_sum' failed on sample 0")
    assert "KeyError" in message and not (tmp_path / "runs").exists()
