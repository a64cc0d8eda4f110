from lightning_moe.tokenization import byte_tokenizer, load_tokenizer


def test_byte_tokenizer_round_trips_any_text_one_token_per_byte():
    tokenizer = byte_tokenizer()
    text = "héllo wörld\n12+3 = 15 ✓"
    ids = tokenizer(text, add_special_tokens=False).input_ids
    assert len(ids) == len(text.encode("utf-8"))
    assert tokenizer.decode(ids) == text
    assert len(tokenizer) == 259


def test_byte_tokenizer_special_tokens_and_chat_template():
    tokenizer = load_tokenizer("bytes")
    assert (tokenizer.pad_token_id, tokenizer.bos_token_id, tokenizer.eos_token_id) == (256, 257, 258)
    prompt = tokenizer.apply_chat_template(
        [{"role": "user", "content": "2+2?"}], tokenize=False, add_generation_prompt=True
    )
    assert prompt == "<s>user\n2+2?</s>\n<s>assistant\n"
    assert tokenizer("</s>", add_special_tokens=False).input_ids == [258]
