"""Shared test settings: offline, CPU, tiny models built from configs."""

import json
import os
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest  # noqa: E402
import torch  # noqa: E402
import yaml  # noqa: E402

# Exact maths computed through different kernels (merged vs unmerged LoRA, a backend vs its loop
# reference, ...) is compared in float64: every rounding there is ~1e-16 relative, so even long
# chains of operations stay orders of magnitude below 1e-10, whichever kernels the CPU picks,
# while a real bug (a wrong scale, a leaked expert, a dropped term) shows at the size of the terms.
FLOAT64_RTOL = 1e-10


def assert_same_maths(actual, expected, rtol: float = FLOAT64_RTOL, msg=None) -> None:
    """assert_close for float64 results of exact maths. The absolute tolerance is rtol times the
    largest |expected|, so entries that cancel to about 0 are judged on the scale of the tensor."""
    assert actual.dtype == expected.dtype == torch.float64, (actual.dtype, expected.dtype)
    atol = rtol * expected.abs().max().item() if expected.numel() else 0.0
    torch.testing.assert_close(actual, expected, rtol=rtol, atol=atol, msg=msg)


# Training runs that round differently (compiled vs eager kernels) differ in losses and gradients
# by ~sqrt(n) * u per sum of n terms, n <= 259 (the vocabulary), ~16 sums in a row: ~1.5e-5 in
# fp32 (u = 6e-8). They cannot agree elementwise after several AdamW steps: AdamW divides each
# gradient element by its own magnitude, so an element whose gradient is within rounding of zero
# may step by up to 2 * lr differently. Such elements hardly change the loss (their gradient is
# ~0) and weigh little in the whole adapter state: at lr = 0.01 one weighs 0.02 against a state
# norm of ~10 (LoRA A's init), 2e-3. So trained runs are compared by their losses at every step
# (rtol 1e-4) and by the relative norm of the difference of the whole adapter state (1e-2: room
# for a few such elements). A real difference is far larger: a router that does not train, or a
# dropped balance loss, moves the state by ~0.2; a 1% learning-rate change moves the loss by 5e-4
# after two steps.
TRAINED_LOSS_RTOL = 1e-4
TRAINED_STATE_RTOL = 1e-2


def relative_difference(actual: dict, expected: dict) -> float:
    """||actual - expected|| / ||expected|| over all tensors of two state dicts with the same keys."""
    assert actual.keys() == expected.keys()
    for key in expected:
        assert actual[key].shape == expected[key].shape, key
    difference = sum(float((actual[k].double() - expected[k].double()).square().sum()) for k in expected)
    size = sum(float(expected[k].double().square().sum()) for k in expected)
    return (difference / size) ** 0.5


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

# The tiny stand-in for SmolLM2 in config test runs (positions for byte-tokenised problems).
TINY_REASONING_LLAMA = TINY_LLAMA | {"max_position_embeddings": 1024}
REASONING_OVERRIDES = [
    "--model.init_args.model=null",
    "--model.init_args.model_config=" + json.dumps(TINY_REASONING_LLAMA),
    "--model.init_args.max_new_tokens=6",
    "--data.init_args.tokenizer=bytes",
    "--data.init_args.instruction=",
    "--data.init_args.train_size=16",
    "--data.init_args.val_size=4",
    "--data.init_args.test_size=4",
    "--data.init_args.batch_size=4",
    "--data.init_args.eval_batch_size=2",
]
# Config folders whose real model is too big for a test: their test runs swap in a tiny random
# model, the in-code byte tokenizer and small data with these overrides.
MULTIMODAL_OVERRIDES = [
    "--model.init_args.language_model=null",
    "--model.init_args.language_model_config=" + json.dumps(TINY_REASONING_LLAMA),
    "--model.init_args.vision_encoder=test_efficientnet",
    "--model.init_args.pretrained_vision=false",
    "--model.init_args.projector_path=null",
    "--model.init_args.max_new_tokens=4",
    "--data.init_args.tokenizer=bytes",
    "--data.init_args.image_token=\u0100",  # the byte tokenizer's symbol for byte 0
    "--data.init_args.image_tokens=4",  # test_efficientnet at 64 px: a 2 x 2 feature map
    "--data.init_args.image_size=64",
    "--data.init_args.domains=[digits, grid, textile]",  # no Fashion-MNIST download in tests
    "--data.init_args.per_domain=4",
    "--data.init_args.test_per_domain=2",
    "--data.init_args.batch_size=4",
    "--data.init_args.eval_batch_size=3",
    "--data.init_args.cache_dir=cache",
]
TINY_UNET = {
    "sample_size": 8,
    "in_channels": 1,
    "out_channels": 1,
    "block_out_channels": [8, 16],
    "layers_per_block": 1,
    "down_block_types": ["CrossAttnDownBlock2D", "DownBlock2D"],
    "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D"],
    "cross_attention_dim": 16,
    "attention_head_dim": 4,
    "norm_num_groups": 4,
}
TINY_TEXT_ENCODER = {
    "model_type": "bert",
    "vocab_size": 259,
    "hidden_size": 16,
    "num_hidden_layers": 1,
    "num_attention_heads": 2,
    "intermediate_size": 32,
}
DIFFUSION_OVERRIDES = [
    "--model.init_args.unet_path=null",
    "--model.init_args.unet_config=" + json.dumps(TINY_UNET),
    "--model.init_args.text_encoder_config=" + json.dumps(TINY_TEXT_ENCODER),
    "--model.init_args.tokenizer=bytes",
    "--model.init_args.num_inference_steps=2",
]
# per data module of a diffusion config: packaged digits (no download in tests), 8 px, few images
TINY_DIGITS = "{source: digits, train_size: 16, val_size: 8}"
DIFFUSION_DATA_OVERRIDES = {
    "CaptionedImageDataModule": [
        "--data.init_args.source=digits",
        "--data.init_args.image_size=8",
        "--data.init_args.train_size=16",
        "--data.init_args.val_size=8",
        "--data.init_args.batch_size=4",
    ],
    "CaptionedImageMix": [
        f"--data.init_args.parts=[{TINY_DIGITS}, {TINY_DIGITS[:-1]}, styles: [inverted]}}]",
        "--data.init_args.image_size=8",
        "--data.init_args.batch_size=4",
    ],
    "ConceptPromptDataModule": [
        "--data.init_args.source=digits",
        "--data.init_args.samples_per_prompt=1",
        "--data.init_args.batch_size=5",
    ],
}
# open_clip's BPE tokenizer (it ships with open_clip) needs its full vocabulary
TINY_CLIP = {
    "embed_dim": 16,
    "vision_cfg": {
        "image_size": 16,
        "patch_size": 8,
        "width": 32,
        "layers": 1,
        "head_width": 16,
        "mlp_ratio": 2.0,
    },
    "text_cfg": {
        "context_length": 16,
        "vocab_size": 49408,
        "width": 32,
        "heads": 2,
        "layers": 1,
        "mlp_ratio": 2.0,
    },
}
# The packaged CLIP's layout (timm trunk + head, HF BERT text tower) at test size: the continual
# configs' adapter targets name its layers. The BERT folder is written by `write_tiny_minilm`.
TINY_MINILM = "tiny_minilm"
TINY_PACKAGED_CLIP = {
    "embed_dim": 16,
    "vision_cfg": {
        "timm_model_name": "test_efficientnet",
        "timm_pool": "avg",
        "timm_proj": "linear",
        "image_size": 16,
    },
    "text_cfg": {
        "hf_model_name": TINY_MINILM,
        "hf_tokenizer_name": TINY_MINILM,
        "hf_pooler_type": "mean_pooler",
        "hf_proj_type": "linear",
        "context_length": 48,  # character-level tokens: a prompt's class name comes late
    },
}


def write_tiny_minilm(folder: str | Path = TINY_MINILM) -> None:
    """A 1-layer BERT with a character-level WordPiece vocabulary, saved as an HF folder."""
    import string

    from transformers import BertConfig, BertModel, BertTokenizer

    folder = Path(folder)
    if folder.exists():
        return
    folder.mkdir(parents=True)
    characters = string.ascii_lowercase + string.digits + string.punctuation
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *characters, *("##" + c for c in characters)]
    BertTokenizer(vocab={token: index for index, token in enumerate(vocab)}).save_pretrained(folder)
    config = BertConfig(
        vocab_size=len(vocab),
        hidden_size=16,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=32,
        max_position_embeddings=64,
    )
    BertModel(config).save_pretrained(folder)


STREAM_OVERRIDES = [
    "--model.init_args.clip_config=" + json.dumps(TINY_PACKAGED_CLIP),
    "--model.init_args.clip_path=null",
    "--model.init_args.image_size=16",
    "--data.init_args.image_size=16",
    "--data.init_args.train_size=8",
    "--data.init_args.test_size=4",
    "--data.init_args.batch_size=4",
]
CONTINUAL_OVERRIDES = [
    "--model.init_args.clip_config=" + json.dumps(TINY_CLIP),
    "--model.init_args.image_size=16",
    "--data.init_args.sources=[digits, textile]",  # packaged, no download in tests
    "--data.init_args.image_size=16",
    "--data.init_args.train_size=8",
    "--data.init_args.val_size=4",
    "--data.init_args.batch_size=4",
]
JUDGE_OVERRIDES = [
    "--data.init_args.sources=[digits]",  # packaged, no download in tests
    "--data.init_args.image_size=16",
    "--data.init_args.train_size=16",
    "--data.init_args.val_size=8",
    "--data.init_args.batch_size=4",
]
TINY_RUN_OVERRIDES = {
    "judges": JUDGE_OVERRIDES,
    "reasoning": REASONING_OVERRIDES,
    "mixtures": REASONING_OVERRIDES,
    "multimodal": MULTIMODAL_OVERRIDES,
}
LLAMA_LINEARS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def expert_folders(configs) -> set[str]:
    """Every expert adapter folder the YAML files `configs` refer to."""

    def collect(node) -> set[str]:
        if isinstance(node, dict):
            found = set(node.get("experts") or [])
            return found.union(*(collect(value) for value in node.values()))
        if isinstance(node, list):
            return set().union(*(collect(value) for value in node))
        return set()

    return set().union(*(collect(yaml.safe_load(path.read_text())) for path in configs))


def write_tiny_experts(folders, seed: int = 0) -> None:
    """Random LoRA experts on every linear of the tiny reasoning Llama, saved at `folders` (relative
    to the working directory), so mixture configs find experts that fit their tiny model."""
    import torch

    from lightning_moe.adapters import AdapterRule, LoraConfig, inject, save_adapter
    from lightning_moe.tasks.causal_lm import build_causal_lm

    for index, folder in enumerate(sorted(folders)):
        model = build_causal_lm(None, TINY_REASONING_LLAMA, 0, torch.float32)
        rules = [AdapterRule(targets=LLAMA_LINEARS, adapter=LoraConfig(rank=2 + index % 2))]
        inject(model, rules)
        torch.manual_seed(seed + index)
        with torch.no_grad():
            for parameter in model.parameters():
                if parameter.requires_grad:
                    parameter.normal_(std=0.1)
        save_adapter(model, rules, folder, base_model="tiny")


@pytest.fixture
def tiny_llama_config() -> dict:
    return dict(TINY_LLAMA)


def config_files(config: Path) -> list[Path]:
    """The YAML files a config's first-line command composes (the config itself if none)."""
    first_line = config.read_text().splitlines()[0]
    named = [config.parents[2] / word for word in first_line.split() if word.endswith(".yaml")]
    return named or [config]


def diffusion_overrides(config: Path) -> list[str]:
    """Tiny UNet and text encoder, tiny data for the config's data module; writes tiny concept
    LoRAs, a gate over them and a judge wherever the diffusion configs look for them."""
    data_class, gate = None, None
    for path in config_files(config):
        settings = yaml.safe_load(path.read_text())
        data_class = settings.get("data", {}).get("class_path", data_class)
        gate = settings["model"]["init_args"].get("adapter_path", gate)
    write_tiny_diffusion_files(sorted(expert_folders(config_files(config))), gate)
    return DIFFUSION_OVERRIDES + DIFFUSION_DATA_OVERRIDES[data_class.rsplit(".", 1)[-1]]


def write_tiny_diffusion_files(experts: list[str], gate: str | None) -> None:
    import torch

    from lightning_moe.adapters import AdapterRule, LoraConfig, XLoraConfig, inject, save_adapter
    from lightning_moe.tasks.concept_judge import ConceptJudge, save_concept_judge
    from lightning_moe.tasks.diffusion import TextToImageModel, build_text_encoder, build_unet

    def tiny_model() -> TextToImageModel:  # layer names as the task's model has them: "unet.…"
        return TextToImageModel(
            build_unet(None, TINY_UNET, seed=0), build_text_encoder(None, TINY_TEXT_ENCODER, None)
        )

    attention = ["to_q", "to_k", "to_v", "to_out.0"]
    for index, folder in enumerate(experts):
        if not Path(folder).exists():
            model = tiny_model()
            rules = [AdapterRule(targets=attention, adapter=LoraConfig(rank=2))]
            inject(model, rules)
            torch.manual_seed(index)
            for parameter in model.parameters():
                if parameter.requires_grad:
                    parameter.data.normal_(std=0.1)
            save_adapter(model, rules, folder, base_model="tiny")
    if gate is not None and not Path(gate).exists():
        model = tiny_model()
        rules = [AdapterRule(targets=attention, adapter=XLoraConfig(experts=experts))]
        inject(model, rules)
        save_adapter(model, rules, gate, base_model="tiny")
    if not Path("runs/judges/concept_judge").exists():
        judge = ConceptJudge("resnet10t", ["handwritten digit"], ["inverted", "framed"], seed=0)
        save_concept_judge(judge, "resnet10t", "runs/judges/concept_judge")


def continual_overrides(config: Path) -> list[str]:
    """The alignment stage gets a tiny CLIP. A stream config gets a tiny CLIP of its CLIP's layout
    (the packaged one, written here, or open_clip's ViT), one epoch per task and two tasks:
    packaged ones, or tiny image-folder roots (written here) when the config reads roots."""
    data_class, model, data = None, {}, {}
    for path in config_files(config):
        settings = yaml.safe_load(path.read_text())
        data_class = settings.get("data", {}).get("class_path", data_class)
        model |= settings.get("model", {}).get("init_args", {})
        data |= settings.get("data", {}).get("init_args", {})
    if data_class.endswith("AlignmentDataModule"):
        return CONTINUAL_OVERRIDES
    if model.get("clip", "").startswith("open_clip:"):
        clip = ["--model.init_args.clip_config=" + json.dumps(TINY_CLIP), *STREAM_OVERRIDES[1:]]
    else:
        write_tiny_minilm()
        clip = STREAM_OVERRIDES
    if any(isinstance(task, dict) for task in data.get("tasks", [])):
        tasks = json.dumps(
            [{"name": name, "root": str(write_image_folder(name))} for name in ("shapes", "shades")]
        )
    else:
        tasks = "[digits, textile]"
    return [
        *clip,
        f"--data.init_args.tasks={tasks}",
        "--data.init_args.epochs_per_task=1",
        "--trainer.precision=32-true",
    ]


def write_image_folder(name: str, classes: int = 2, images: int = 4) -> Path:
    """A tiny image-folder dataset, root/{train,test}/class_<c>/<i>.png, with a colour per class."""
    from PIL import Image

    root = Path("image_folders") / name
    for split in ("train", "test"):
        for label in range(classes):
            folder = root / split / f"class_{label}"
            folder.mkdir(parents=True, exist_ok=True)
            for index in range(images):
                colour = (80 * label + 10 * index, 40 * index, 200 - 60 * label)
                Image.new("RGB", (12, 12), colour).save(folder / f"{index}.png")
    return root


@pytest.fixture
def tiny_run_overrides():
    """The overrides that make a config's test run use a tiny model (none for tiny configs).
    For mixture and diffusion configs it also writes tiny expert LoRAs (and the diffusion gate
    and judge) where the configs look for them."""

    def overrides(config: Path) -> list[str]:
        if config.parent.name == "mixtures":
            missing = {
                folder for folder in expert_folders(config.parent.glob("*.yaml")) if not Path(folder).exists()
            }
            write_tiny_experts(missing)
        if config.parent.name == "diffusion":
            return diffusion_overrides(config)
        if config.parent.name == "continual":
            return continual_overrides(config)
        return TINY_RUN_OVERRIDES.get(config.parent.name, [])

    return overrides


@pytest.fixture
def tiny_experts():
    """write(folders): tiny random LoRA experts that fit the tiny reasoning Llama."""
    return write_tiny_experts


@pytest.fixture
def run_config(tmp_path, monkeypatch, tiny_run_overrides):
    """run_config(config, subcommand, *args): the CLI on a config with its tiny-model overrides,
    in a temporary working directory."""
    from lightning_moe.cli import main

    monkeypatch.chdir(tmp_path)

    def run(config: Path, subcommand: str, *args: str):
        return main([subcommand, "--config", str(config), *tiny_run_overrides(config), *args])

    return run
