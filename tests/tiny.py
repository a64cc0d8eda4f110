"""Tiny models for the tests, built from configs (random weights, CPU, offline), and the tiny
files some configs read (expert LoRAs, a diffusion gate and judge, a text tower, image folders).

The tiny settings of whole runs live in YAML overlays beside this file (tests/configs/), composed
after a config with `--config`; the settings here are those the tests build models from in code.
"""

from __future__ import annotations

import string
from fnmatch import fnmatch
from pathlib import Path

import torch
import yaml
from torch import nn

from lightning_moe.data.verified_prompts import VerifiedPrompts

REPO = Path(__file__).resolve().parents[1]
TEST_CONFIGS = REPO / "tests" / "configs"

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
# the tiny stand-in for SmolLM2 (tests/configs/reasoning.yaml): positions for byte-tokenised problems
TINY_REASONING_LLAMA = TINY_LLAMA | {"max_position_embeddings": 1024}
LLAMA_LINEARS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
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
# a two-slot canvas latent (4 x 8): cross-attention at both resolutions, self-attention at the
# lower one and in the mid block, as in configs/diffusion/canvas_base.yaml
TINY_CANVAS_UNET = TINY_UNET | {
    "sample_size": [4, 8],
    "down_block_types": ["CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
    "up_block_types": ["CrossAttnUpBlock2D", "CrossAttnUpBlock2D"],
    "only_cross_attention": [True, False],
}
TINY_TEXT_ENCODER = {
    "model_type": "bert",
    "vocab_size": 259,
    "hidden_size": 16,
    "num_hidden_layers": 1,
    "num_attention_heads": 2,
    "intermediate_size": 32,
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
TINY_MINILM = "tiny_minilm"  # the packaged CLIP's text tower at test size, written by `write_tiny_minilm`
VOCAB_SIZE = 64  # of the adapter-core tests' Llama


def overlay(name: str) -> str:
    """The `--config` argument of the tiny overlay tests/configs/<name>.yaml."""
    return f"--config={TEST_CONFIGS / f'{name}.yaml'}"


# --- models for the adapter-core tests -----------------------------------------------------------
def build_llama(seed: int = 0, hidden_size: int = 32, dtype: torch.dtype = torch.float32) -> nn.Module:
    """A 2-layer Llama (GQA attention, SwiGLU MLP) with random weights, in eval mode; the weights
    are drawn in fp32 whatever `dtype`, so a float64 model holds the same values."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=VOCAB_SIZE,
        hidden_size=hidden_size,
        intermediate_size=2 * hidden_size,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
    )
    torch.manual_seed(seed)
    return LlamaForCausalLM(config).to(dtype).eval()


def build_clip(seed: int = 0) -> nn.Module:
    """An open_clip CLIP with a 1-layer ViT (16px images, 8px patches) and a 1-layer text tower."""
    import open_clip

    torch.manual_seed(seed)
    model = open_clip.CLIP(
        embed_dim=16,
        vision_cfg={
            "image_size": 16,
            "patch_size": 8,
            "width": 32,
            "layers": 1,
            "head_width": 16,
            "mlp_ratio": 2.0,
        },
        text_cfg={
            "context_length": 8,
            "vocab_size": VOCAB_SIZE,
            "width": 32,
            "heads": 2,
            "layers": 1,
            "mlp_ratio": 2.0,
        },
    )
    return model.eval()


def build_unet(seed: int = 0) -> nn.Module:
    """A diffusers UNet2DConditionModel with one cross-attention down block and one up block."""
    from diffusers import UNet2DConditionModel

    torch.manual_seed(seed)
    model = UNet2DConditionModel(
        sample_size=16,
        in_channels=4,
        out_channels=4,
        block_out_channels=(32, 64),
        layers_per_block=1,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=32,
        attention_head_dim=8,
        norm_num_groups=8,
    )
    return model.eval()


@torch.no_grad()
def randomize_adapters(model: nn.Module, seed: int = 0, scale: float = 0.2) -> None:
    """Give every adapter parameter random values (LoRA B starts at 0, which would make tests vacuous)."""
    from lightning_moe.adapters import adapted_layers

    torch.manual_seed(seed)
    for _, layer in adapted_layers(model):
        for parameter in layer.adapter.parameters():
            parameter.copy_(torch.randn_like(parameter) * scale)


def tiny_causal_lm_task(model_config: dict, **kwargs):
    """A CausalLMTask on a tiny Llama config with MoE experts (top-2) on the MLP's up projection
    and LoRA on the query projection, its model configured."""
    from lightning_moe.adapters import AdapterRule, LoraConfig, MoEConfig
    from lightning_moe.tasks.reasoning import CausalLMTask

    rules = [
        AdapterRule(["mlp.up_proj"], MoEConfig(num_experts=4, top_k=2)),
        AdapterRule(["self_attn.q_proj"], LoraConfig(rank=4)),
    ]
    task = CausalLMTask(model_config=model_config, adapters=rules, **kwargs)
    task.configure_model()
    return task


# --- files that configs read -----------------------------------------------------------------
def write_tiny_minilm(folder: str | Path = TINY_MINILM) -> None:
    """A 1-layer BERT with a character-level WordPiece vocabulary, saved as an HF folder."""
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


def write_image_folder(name: str, classes: int = 2, images: int = 4) -> Path:
    """A tiny image-folder dataset, image_folders/<name>/{train,test}/class_<c>/<i>.png, a colour per class."""
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


def write_tiny_experts(folders, seed: int = 0, language_model: bool = False) -> None:
    """Random LoRA experts on every linear of the tiny reasoning Llama (`language_model`: of the
    tiny multimodal overlay's LM, inside a vision-language model), saved at `folders` (relative
    to the working directory), so mixture configs find experts that fit their tiny model."""
    from lightning_moe.adapters import AdapterRule, LoraConfig, inject, save_adapter
    from lightning_moe.tasks.reasoning import build_causal_lm

    overlay_lm = yaml.safe_load((TEST_CONFIGS / "multimodal.yaml").read_text())["model"]["init_args"]
    for index, folder in enumerate(sorted(folders)):
        if language_model:  # named as inside VisionLanguageModel
            model = nn.Module()
            model.language_model = build_causal_lm(
                None, overlay_lm["language_model_config"], 0, torch.float32
            )
        else:
            model = build_causal_lm(None, TINY_REASONING_LLAMA, 0, torch.float32)
        rules = [AdapterRule(targets=LLAMA_LINEARS, adapter=LoraConfig(rank=2 + index % 2))]
        inject(model, rules)
        torch.manual_seed(seed + index)
        with torch.no_grad():
            for parameter in model.parameters():
                if parameter.requires_grad:
                    parameter.normal_(std=0.1)
        save_adapter(model, rules, folder, base_model="tiny")


TINY_AUDIO_TOKENS = 2  # tests/configs/multimodal_audio.yaml's audio_tokens


def write_tiny_audio_encoder(folder: str | Path) -> None:
    """A random 16-wide audio encoder of TINY_AUDIO_TOKENS tokens, saved as a stage-0 run exports it."""
    from lightning_moe.tasks.multimodal.audio_encoder import AudioEncoder, save_audio_encoder

    save_audio_encoder(AudioEncoder(width=16, tokens=TINY_AUDIO_TOKENS), folder)


def _tiny_text_to_image_model(unet_config: dict) -> nn.Module:
    """The diffusion task's model at test size (its layers are named "unet.…" as in the task)."""
    from lightning_moe.tasks.diffusion.models import TextToImageModel, build_text_encoder, build_unet

    return TextToImageModel(
        build_unet(None, unet_config, seed=0), build_text_encoder(None, TINY_TEXT_ENCODER, None)
    )


def _tiny_unet_for(folder: str) -> dict:
    """The tiny UNet a LoRA folder's config runs on: the canvas one for the canvas LoRAs."""
    return TINY_CANVAS_UNET if "/canvas/" in folder else TINY_UNET


def write_tiny_diffusion_files(loras: list[str], gate: str | None, judge: str | None) -> None:
    """Tiny concept LoRAs at `loras`, an X-LoRA gate over them at `gate` and a concept judge at
    `judge` (the folders the diffusion configs read), each only if it is not there yet. The judge
    knows every packaged object and both styles, so it serves the single-image and canvas sets."""
    from lightning_moe.adapters import AdapterRule, LoraConfig, XLoraConfig, inject, save_adapter
    from lightning_moe.data.captioned_images import judged_objects
    from lightning_moe.tasks.diffusion import ConceptJudge
    from lightning_moe.tasks.diffusion.concept_judge import save_concept_judge

    attention = ["to_q", "to_k", "to_v", "to_out.0"]
    for index, folder in enumerate(loras):
        if not Path(folder).exists():
            model = _tiny_text_to_image_model(_tiny_unet_for(folder))
            rules = [AdapterRule(targets=attention, adapter=LoraConfig(rank=2))]
            inject(model, rules)
            torch.manual_seed(index)
            for parameter in model.parameters():
                if parameter.requires_grad:
                    parameter.data.normal_(std=0.1)
            save_adapter(model, rules, folder, base_model="tiny")
    if gate is not None and not Path(gate).exists():
        model = _tiny_text_to_image_model(TINY_UNET)
        rules = [AdapterRule(targets=attention, adapter=XLoraConfig(experts=loras))]
        inject(model, rules)
        save_adapter(model, rules, gate, base_model="tiny")
    if judge is not None and not Path(judge).exists():
        objects = judged_objects(["fashion-mnist", "mnist-5k", "textile"])
        tiny_judge = ConceptJudge("resnet10t", objects, ["inverted", "framed"], seed=0)
        save_concept_judge(tiny_judge, "resnet10t", judge)


def _values(node, key: str) -> list:
    """Every value stored under `key` anywhere in a parsed YAML tree."""
    if isinstance(node, dict):
        own = [node[key]] if key in node else []
        return own + [value for child in node.values() for value in _values(child, key)]
    if isinstance(node, list):
        return [value for child in node for value in _values(child, key)]
    return []


def write_files_configs_read(configs: list[Path]) -> None:
    """Before a config runs on tiny models: tiny versions of the files it reads (expert LoRAs,
    a gate, a judge), written where the config looks for them (relative to the working directory)."""
    trees = [yaml.safe_load(path.read_text()) for path in configs]
    experts = sorted({folder for tree in trees for folders in _values(tree, "experts") for folder in folders})
    gates = [path for tree in trees for path in _values(tree, "adapter_path") if path]
    judges = [path for tree in trees for path in _values(tree, "judge_path") if path]
    upcycled = {
        folder for tree in trees for folders in _values(tree, "expert_init") for folder in folders if folder
    }
    write_tiny_experts(
        [folder for folder in sorted(upcycled) if not Path(folder).exists()], language_model=True
    )
    for folder in {folder for tree in trees for folder in _values(tree, "audio_encoder") if folder}:
        if not Path(folder).exists():
            write_tiny_audio_encoder(folder)
    if any(folder.startswith("runs/diffusion") for folder in experts) or judges:
        write_tiny_diffusion_files(experts, gates[-1] if gates else None, judges[-1] if judges else None)
    elif experts:
        write_tiny_experts([folder for folder in experts if not Path(folder).exists()])


# --- tiny runs of the shipped configs ----------------------------------------------------------
# (pattern of a config under configs/, the tests/configs overlays that make its run tiny); first match
TINY_OVERLAYS = [
    ("smoke/*", []),
    ("reasoning/*", ["reasoning"]),
    ("mixtures/*", ["reasoning"]),
    ("inits/*", ["reasoning"]),
    ("memory/l4q.yaml", ["reasoning", "memory_l4q"]),
    ("memory/nf4_embeddings.yaml", ["reasoning", "memory_embeddings"]),
    ("memory/*", ["reasoning"]),
    ("rl/*", ["reasoning", "rl"]),
    ("multimodal/audio_encoder.yaml", ["audio_encoder"]),
    ("multimodal/*audio*", ["multimodal", "multimodal_audio"]),
    ("multimodal/*", ["multimodal"]),
    ("judges/*", ["judges"]),
    ("diffusion/gate_concepts.yaml", ["diffusion", "diffusion_mix"]),
    ("diffusion/compose_canvas_*", ["diffusion", "diffusion_canvas", "diffusion_canvas_prompts"]),
    ("diffusion/compose_*", ["diffusion", "diffusion_prompts"]),
    ("diffusion/*", ["diffusion", "diffusion_captioned"]),
    ("continual/align_clip.yaml", ["continual_align"]),
    ("continual/mtil_*", ["continual_mtil"]),
    ("continual/*", ["continual_stream"]),
]


def launch_configs(config: Path) -> list[Path]:
    """The YAML files a config's first-line command composes (the config itself if none)."""
    first_line = config.read_text().splitlines()[0]
    named = [REPO / word for word in first_line.split() if word.endswith(".yaml")]
    return named or [config]


def tiny_run_arguments(config: Path, composed: list[Path] | None = None) -> list[str]:
    """The `--config` overlays that make a run of `config` tiny, after writing (in the working
    directory) the tiny files it and `composed` (the other files of its command) read."""
    relative = str(config.relative_to(REPO / "configs"))
    names = next(names for pattern, names in TINY_OVERLAYS if fnmatch(relative, pattern))
    write_files_configs_read([*(composed or []), config])
    if "continual_stream" in names:
        write_tiny_minilm()
    if "continual_mtil" in names:
        for name in ("shapes", "shades"):
            write_image_folder(name)
    return [overlay(name) for name in names]


# --- rewards a tiny random model can earn --------------------------------------------------------
def _number_reward(task: str, answer: str | None, entry: dict) -> float:
    """1 for the reference answer, 0.5 for any other number, 0 for none."""
    if answer is None:
        return 0.0
    return 1.0 if answer == entry["answer"] else 0.5


class NumberRewardPrompts(VerifiedPrompts):
    """`VerifiedPrompts` whose verifier pays 0.5 for any number (with `answer_extraction:
    last_number`, the random bytes of a tiny model hold one now and then), so that groups differ
    and GRPO has a signal; usable by class path from a subprocess (PYTHONPATH = the repo)."""

    def verifier(self):
        return _number_reward
