import torch

from lightning_moe.data.collate import IGNORE_INDEX, PromptCompletion, collate_prompt_completion


def test_pads_to_longest_and_masks_prompt_and_padding():
    batch = collate_prompt_completion(
        [PromptCompletion([1, 2, 3], [4, 5], "a"), PromptCompletion([6], [7], "b")], pad_token_id=0
    )
    assert batch["input_ids"].tolist() == [[1, 2, 3, 4, 5], [6, 7, 0, 0, 0]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1, 1, 1], [1, 1, 0, 0, 0]]
    x = IGNORE_INDEX
    assert batch["labels"].tolist() == [[x, x, x, 4, 5], [x, 7, x, x, x]]
    assert batch["domain"] == ["a", "b"]


def test_max_length_truncates_both_ids_and_labels():
    batch = collate_prompt_completion([PromptCompletion([1, 2, 3], [4, 5, 6])], pad_token_id=0, max_length=4)
    assert batch["input_ids"].shape == (1, 4)
    assert batch["labels"].tolist() == [[IGNORE_INDEX] * 3 + [4]]


def test_loss_is_computed_on_completion_tokens_only():
    from transformers import AutoConfig, AutoModelForCausalLM

    torch.manual_seed(0)
    config = AutoConfig.for_model(
        "llama",
        vocab_size=16,
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=1,
    )
    model = AutoModelForCausalLM.from_config(config)
    batch = collate_prompt_completion([PromptCompletion([1, 2, 3], [4, 5])], pad_token_id=0)
    loss = model(input_ids=batch["input_ids"], labels=batch["labels"]).loss
    logits = model(input_ids=batch["input_ids"]).logits[0]
    # positions 2 and 3 predict the completion tokens 4 and 5
    expected = torch.nn.functional.cross_entropy(logits[2:4], torch.tensor([4, 5]))
    torch.testing.assert_close(loss, expected)


def test_padding_to_a_multiple_gives_one_shape_and_changes_no_token():
    examples = [PromptCompletion([1, 2], [3]), PromptCompletion([4], [5, 6, 7, 8])]
    plain = collate_prompt_completion(examples, pad_token_id=0, for_generation=True)
    padded = collate_prompt_completion(examples, pad_token_id=0, for_generation=True, pad_to_multiple_of=8)
    assert padded["input_ids"].shape == padded["labels"].shape == (2, 8)
    assert padded["prompt_ids"].shape == (2, 8)
    length = plain["input_ids"].shape[1]
    assert torch.equal(padded["input_ids"][:, :length], plain["input_ids"])
    assert torch.equal(padded["labels"][:, :length], plain["labels"])
    assert (padded["labels"][:, length:] == IGNORE_INDEX).all() and (
        padded["attention_mask"][:, length:] == 0
    ).all()
    assert torch.equal(padded["prompt_ids"][:, -plain["prompt_ids"].shape[1] :], plain["prompt_ids"])
