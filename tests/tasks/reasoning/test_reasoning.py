"""The reasoning task on a tiny random Llama with the byte tokenizer, through the real CLI."""

import json

import pytest
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from lightning_moe.tasks.reasoning import ReasoningTask
from tests.tiny import REPO

CONFIG = REPO / "configs/reasoning/mole_smollm2.yaml"


@pytest.fixture
def run(run_config):
    """run(subcommand, *args): the CLI on the MoLE reasoning config with a tiny model."""
    return lambda subcommand, *args: run_config(CONFIG, subcommand, *args)


def greedy_reference(model, prompt_ids: list[int], steps: int, eos: int) -> list[int]:
    """Greedy decoding the slow way: the whole unpadded sequence through the model per token."""
    tokens = list(prompt_ids)
    for _ in range(steps):
        with torch.no_grad():
            next_token = int(model(input_ids=torch.tensor([tokens])).logits[0, -1].argmax())
        tokens.append(next_token)
        if next_token == eos:
            break
    return tokens[len(prompt_ids) :]


def test_batched_generation_equals_unpadded_greedy_decoding(run):
    cli = run("validate", "--trainer.limit_val_batches=1", "--data.init_args.eval_batch_size=3")
    task, datamodule = cli.model, cli.datamodule
    torch.manual_seed(0)
    for name, parameter in task.model.named_parameters():
        if ".adapter." in name:  # non-zero adapters, so the check covers the adapted path
            parameter.data.normal_(0, 0.5)
    batch = next(iter(datamodule.val_dataloader()))
    assert len(set(batch["prompt_mask"].sum(1).tolist())) > 1, "prompts of different lengths"
    task.model.eval()
    generations = task.generate(batch)
    tokenizer = datamodule.tokenizer
    for example, generated in zip(datamodule.splits["val"], generations, strict=False):
        expected = greedy_reference(
            task.model, example.prompt_ids, task.max_new_tokens, tokenizer.eos_token_id
        )
        assert generated == tokenizer.decode(expected, skip_special_tokens=True)


def test_validation_and_test_log_both_scores(run, monkeypatch):
    # generations that answer the first problem right in the #### format and the rest wrongly
    def fake_generate(self, batch):
        return [f"#### {r}" if i == 0 else f"about {r}1" for i, r in enumerate(batch["reference"])]

    monkeypatch.setattr(ReasoningTask, "generate", fake_generate)
    cli = run("fit", "--trainer.max_steps=2", "--trainer.val_check_interval=2")
    metrics = cli.trainer.callback_metrics
    # 4 validation problems in batches of 2: the first of each batch is right
    assert metrics["val/strict_match"] == pytest.approx(0.5)
    assert metrics["val/flexible_match"] == pytest.approx(0.5)
    (result,) = cli.trainer.test(cli.model, datamodule=cli.datamodule)
    assert result["test/strict_match"] == pytest.approx(0.5)
    assert {"test/loss", "test/balance_loss", "test/flexible_match"} <= set(result)


def test_saved_adapter_tests_and_predicts_in_a_new_run(run, tmp_path):
    fit = run("fit", "--trainer.max_steps=3", "--trainer.logger.init_args.version=fit")
    adapter = tmp_path / "runs/reasoning/mole_smollm2/fit/adapter"
    assert (adapter / "adapter_model.safetensors").is_file()

    test = run("test", f"--model.init_args.adapter_path={adapter}")
    for name, parameter in fit.model.state_dict().items():
        assert torch.equal(test.model.state_dict()[name], parameter), name

    predictions = tmp_path / "predictions.jsonl"
    predict = run(
        "predict",
        f"--model.init_args.adapter_path={adapter}",
        "--trainer.callbacks=lightning_moe.callbacks.JsonlPredictionWriter",
        f"--trainer.callbacks.path={predictions}",
    )
    records = [json.loads(line) for line in predictions.read_text().splitlines()]
    assert len(records) == 4
    expected_prompts = [e.prompt_text for e in predict.datamodule.splits["test"]]
    assert [r["prompt"] for r in records] == expected_prompts
    for record in records:
        assert set(record) == {
            "prompt", "domain", "reference", "generation",
            "strict_answer", "strict_correct", "flexible_answer", "flexible_correct",
        }  # fmt: skip
        assert isinstance(record["strict_correct"], bool)
        assert record["domain"] == "gsm_symbolic"

    with pytest.raises(SystemExit, match=r"prediction file .*predictions.jsonl exists"):
        run(
            "predict",
            f"--model.init_args.adapter_path={adapter}",
            "--trainer.callbacks=lightning_moe.callbacks.JsonlPredictionWriter",
            f"--trainer.callbacks.path={predictions}",
        )
    assert len(predictions.read_text().splitlines()) == 4


def test_before_after_table_scores_the_base_first(run, tmp_path, monkeypatch):
    calls = []

    def fake_generate(self, batch):
        calls.append(self.global_step)
        # wrong before training, right after it
        return [f"#### {r}" if self.global_step else "####" for r in batch["reference"]]

    monkeypatch.setattr(ReasoningTask, "generate", fake_generate)
    run(
        "fit",
        "--trainer.max_steps=2",
        "--trainer.val_check_interval=2",
        "--trainer.logger.init_args.version=demo",
        "--trainer.callbacks+=lightning_moe.callbacks.BeforeAfterTable",
        "--trainer.callbacks.metrics=[val/strict_match, val/loss]",
    )
    assert calls == [0, 0, 2, 2]  # the whole validation set before training, then after it
    folder = tmp_path / "runs/reasoning/mole_smollm2/demo"
    table = (folder / "before_after.md").read_text().splitlines()
    assert table[0].endswith("noise (2 s.e., n=4) |")  # the overlay's 4 validation problems
    # every answer was wrong, then right: the change is exact, its noise (2 s.e.) is 0
    assert table[2] == "| val/strict_match | 0.0000 | 1.0000 | +1.0000 | ± 0.0000 |"
    assert table[3].startswith("| val/loss | ") and table[3].endswith(" |  |")
    assert table[5].startswith("routing: entropy ") and "(training step " in table[5]
    events = EventAccumulator(str(folder), size_guidance={"tensors": 0}).Reload()
    assert [(e.step, e.value) for e in events.Scalars("val/strict_match")] == [(0, 0.0), (1, 1.0)]
    assert {"before_after/text_summary", "val/samples/text_summary"} <= set(events.Tags()["tensors"])
