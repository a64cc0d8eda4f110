"""The CLIP alignment stage on a tiny CLIP: its loss against open_clip's, what trains, the export,
and its data (alignment pools apart from every stream image)."""

import numpy as np
import open_clip
import pytest
import torch
from torch import nn
from torch.nn import functional as F

from lightning_moe.data.clip_alignment import AlignmentDataModule
from lightning_moe.data.continual_streams import TaskIncrementalStream
from lightning_moe.errors import UserInputError
from lightning_moe.tasks.continual.clip_alignment import ClipAlignmentTask, multi_positive_contrastive_loss
from lightning_moe.tasks.continual.clip_models import ClipModel, build_clip, zero_shot_head
from tests.tiny import TINY_CLIP
from tests.tolerances import assert_same_maths


def features(rows: int, seed: int) -> torch.Tensor:
    """float64: the losses below are the same maths through other code (see assert_same_maths)."""
    generator = torch.Generator().manual_seed(seed)
    return F.normalize(torch.randn(rows, 8, generator=generator, dtype=torch.float64), dim=-1)


def test_loss_with_distinct_captions_equals_open_clip_loss():
    image, text, scale = features(5, 0), features(5, 1), torch.tensor(10.0, dtype=torch.float64)
    ours = multi_positive_contrastive_loss(image, text, [f"caption {i}" for i in range(5)], scale)
    assert_same_maths(ours, open_clip.ClipLoss()(image, text, scale))


def test_identical_captions_are_all_positives():
    image, text, scale = features(3, 0), features(3, 1), torch.tensor(5.0, dtype=torch.float64)
    logits = scale * image @ text.T
    targets = torch.tensor([[0.5, 0.5, 0.0], [0.5, 0.5, 0.0], [0.0, 0.0, 1.0]], dtype=torch.float64)
    expected = (
        -(targets * logits.log_softmax(1)).sum(1).mean() - (targets * logits.T.log_softmax(1)).sum(1).mean()
    ) / 2
    assert_same_maths(multi_positive_contrastive_loss(image, text, ["a", "a", "b"], scale), expected)


def test_alignment_trains_only_projections_and_temperature_and_exports_them(tmp_path):
    data = AlignmentDataModule(sources=["digits"], image_size=16, train_size=8, val_size=4, batch_size=8)
    task = ClipAlignmentTask(clip_config=TINY_CLIP, image_size=16, data=data)
    task.configure_model()
    trainable = {name for name, p in task.model.clip.named_parameters() if p.requires_grad}
    assert trainable == {"logit_scale", "visual.proj", "text_projection"}
    data.setup("fit")
    batch = next(iter(data.train_dataloader()))
    before = {name: p.detach().clone() for name, p in task.model.clip.named_parameters()}
    loss, _ = task.task_loss(batch)
    loss.backward()
    with torch.no_grad():
        for parameter in task.model.clip.parameters():
            if parameter.grad is not None:
                parameter -= 0.1 * parameter.grad
    changed = {name for name, p in task.model.clip.named_parameters() if not torch.equal(p, before[name])}
    assert changed == trainable
    task.export(str(tmp_path / "clip"))
    reloaded = build_clip(clip_config=TINY_CLIP, clip_path=str(tmp_path / "clip"))
    for name, value in reloaded.clip.state_dict().items():
        assert torch.equal(value, task.model.clip.state_dict()[name])


def test_a_zero_shot_head_averages_normalised_template_features():
    model = build_clip(clip_config=TINY_CLIP).eval().double()  # a batch of 4 vs 2: other kernels
    head = zero_shot_head(model, ["cat", "dog"], ["a photo of a {}.", "a {}."])
    cat = model.encode_texts(["a photo of a cat.", "a cat."]).mean(0)
    assert_same_maths(head[0], F.normalize(cat, dim=-1))
    assert head.shape == (2, 16)


def test_alignment_images_are_never_stream_images_and_captions_name_their_class():
    data = AlignmentDataModule(sources=["digits"], image_size=8, train_size=50, val_size=20)
    data.setup("fit")
    stream = TaskIncrementalStream(["digits", "textile"], image_size=8, train_size=None, test_size=None)
    digits = stream.tasks[0]
    stream_images = {digits.train.pixels[i].tobytes() for i in range(len(digits.train))}
    stream_images |= {digits.test.pixels[i].tobytes() for i in range(len(digits.test))}
    pool = data.tasks[0].train
    overlap = np.mean([pool.pixels[i].tobytes() in stream_images for i in range(len(pool))])
    assert overlap < 0.01  # only pixel-identical duplicates inside the source
    item = data.splits["train"][0]
    assert f'"{item["label"]}"' in item["caption"]  # 'a blurry photo of the number "7".'
    assert len(data.splits["train"]) == 50 and len(data.splits["val"]) == 20


def test_an_unknown_clip_or_missing_aligned_weights_is_one_clear_error(tmp_path):
    with pytest.raises(UserInputError, match="clip must be 'packaged'.*got 'vit-b-16'"):
        build_clip("vit-b-16")
    with pytest.raises(UserInputError, match="no CLIP weights in .*align the packaged CLIP first"):
        build_clip(clip_config=TINY_CLIP, clip_path=str(tmp_path))


def test_training_mode_keeps_batch_norm_statistics_frozen():
    clip = nn.Sequential(nn.Conv2d(3, 4, 1), nn.BatchNorm2d(4))
    model = ClipModel(clip, tokenizer=None, mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5)).train()
    assert model.training and clip[0].training and not clip[1].training
    before = clip[1].running_mean.clone()
    clip(torch.randn(2, 3, 4, 4) + 3)
    assert torch.equal(clip[1].running_mean, before)


def test_cached_trunk_features_equal_encoding_the_images():
    timm_clip = TINY_CLIP | {
        "vision_cfg": {
            "timm_model_name": "test_efficientnet",
            "timm_pool": "avg",
            "timm_proj": "linear",
            "image_size": 16,
        }
    }
    data = AlignmentDataModule(sources=["digits"], image_size=16, train_size=8, val_size=4, batch_size=4)
    task = ClipAlignmentTask(clip_config=timm_clip, image_size=16, data=data)
    task.configure_model()
    task.model.double()  # cached rows were encoded in other batches, by other kernels
    data.setup("fit")
    loader = data.train_dataloader()
    for _ in range(2):  # the first epoch fills the cache, the second reads it
        for batch in loader:
            images = batch["image"].double()
            expected = task.model.encode_images(images)
            features = task.image_features(task.model, images, batch["key"].tolist())
            assert_same_maths(features, expected)
    assert len(task.image_features.trunk_features) == 8
    keys = [data.splits["train"][i]["key"] for i in range(8)] + [
        data.splits["val"][i]["key"] for i in range(4)
    ]
    assert len(set(keys)) == 12  # train and validation images never share a cache key


def test_a_small_pool_still_has_validation_images():
    data = AlignmentDataModule(sources=["digits", "textile"], image_size=8, train_size=5000, val_size=50)
    data.setup("fit")
    pools = [len(task.train) for task in data.tasks]  # 718 digits, 800 textile images
    assert len(data.splits["val"]) == 100 and len(data.splits["train"]) == sum(pools) - 100
