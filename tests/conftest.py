"""Shared test settings: offline, CPU, tiny models built from configs."""

import json
import os
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest  # noqa: E402

TINY_LLAMA = {
    "model_type": "llama",
    "vocab_size": 259,
    "hidden_size": 32,
    "intermediate_size": 64,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "max_position_embeddings": 64,
}

# Config folders whose real model is too big for a test: their test runs swap in a tiny random
# model, the in-code byte tokenizer and small data with these overrides.
TINY_RUN_OVERRIDES = {
    "reasoning": [
        "--model.init_args.model=null",
        "--model.init_args.model_config=" + json.dumps(TINY_LLAMA | {"max_position_embeddings": 1024}),
        "--model.init_args.max_new_tokens=6",
        "--data.init_args.tokenizer=bytes",
        "--data.init_args.instruction=",
        "--data.init_args.train_size=16",
        "--data.init_args.val_size=4",
        "--data.init_args.test_size=4",
        "--data.init_args.batch_size=4",
        "--data.init_args.eval_batch_size=2",
    ],
}


@pytest.fixture
def tiny_llama_config() -> dict:
    return dict(TINY_LLAMA)


@pytest.fixture
def tiny_run_overrides():
    """The overrides that make a config's test run use a tiny model (none for tiny configs)."""

    def overrides(config: Path) -> list[str]:
        return TINY_RUN_OVERRIDES.get(config.parent.name, [])

    return overrides
