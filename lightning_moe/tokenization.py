"""Tokenizers by name: a byte-level tokenizer built in code (for tiny test models, no download),
a packaged asset name (see `lightning_moe.assets`), or any Hugging Face tokenizer folder / hub id."""

from __future__ import annotations

from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from transformers import AutoTokenizer, PreTrainedTokenizerBase, PreTrainedTokenizerFast

from lightning_moe.assets import resolve_pretrained

BYTE_TOKENIZER = "bytes"
BYTE_SPECIAL_TOKENS = ["<pad>", "<s>", "</s>"]
# A minimal chat template so chat-formatted prompts work with the byte tokenizer too.
BYTE_CHAT_TEMPLATE = (
    "{% for message in messages %}<s>{{ message['role'] }}\n{{ message['content'] }}</s>\n{% endfor %}"
    "{% if add_generation_prompt %}<s>assistant\n{% endif %}"
)


def byte_tokenizer() -> PreTrainedTokenizerFast:
    """259 tokens: the 256 byte symbols of byte-level BPE (no merges) plus pad, bos and eos."""
    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    vocab = {symbol: index for index, symbol in enumerate(alphabet)}
    for token in BYTE_SPECIAL_TOKENS:
        vocab[token] = len(vocab)
    core = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    core.decoder = decoders.ByteLevel()
    core.add_special_tokens(BYTE_SPECIAL_TOKENS)
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=core, pad_token="<pad>", bos_token="<s>", eos_token="</s>"
    )
    tokenizer.chat_template = BYTE_CHAT_TEMPLATE
    return tokenizer


def load_tokenizer(name_or_path: str, cache_dir: str | None = None) -> PreTrainedTokenizerBase:
    """`"bytes"` builds the in-code byte tokenizer; anything else is resolved as an asset
    (`cache_dir`: where converted assets live) and read by AutoTokenizer."""
    if name_or_path == BYTE_TOKENIZER:
        return byte_tokenizer()
    tokenizer = AutoTokenizer.from_pretrained(resolve_pretrained(name_or_path, cache_dir))
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer
