"""The LLaVA-style model: packaged encoder weights, image-token splicing, frozen encoder."""

import pytest
import torch

from lightning_moe.assets import resolve_pretrained
from lightning_moe.errors import UserInputError
from lightning_moe.tasks.multimodal.vision_language import VisionLanguageModel, build_vision_encoder
from lightning_moe.tasks.reasoning.causal_lm import build_causal_lm

IMAGE_TOKEN_ID = 3


@pytest.fixture
def tiny_vlm(tiny_llama_config) -> VisionLanguageModel:
    torch.manual_seed(0)
    vision = build_vision_encoder("test_efficientnet", pretrained=False)
    language_model = build_causal_lm(None, tiny_llama_config, 0, torch.float32)
    return VisionLanguageModel(vision, language_model, IMAGE_TOKEN_ID)


def test_packaged_efficientnet_weights_load_in_order():
    encoder = build_vision_encoder("efficientnet-lite0")
    source = torch.load(resolve_pretrained("efficientnet-lite0"), weights_only=True)
    assert torch.equal(encoder.encoder.conv_stem.weight, source["_conv_stem.weight"])
    assert torch.equal(encoder.encoder.bn2.running_var, source["_bn1.running_var"])
    assert not any(p.requires_grad for p in encoder.parameters()) and not encoder.training
    assert encoder(torch.zeros(1, 3, 128, 128)).shape == (1, 16, 1280)  # a 4 x 4 map's cells


def test_image_tokens_replace_the_slots_in_order(tiny_vlm):
    images = torch.randn(2, 3, 64, 64)
    visual = tiny_vlm.image_embeddings(images)
    count = visual.shape[1]
    assert count > 1
    # the two rows put their slots at different offsets, with padding after the shorter one
    rows = [[5, 6] + [IMAGE_TOKEN_ID] * count + [7, 8, 9], [10] + [IMAGE_TOKEN_ID] * count + [11, 0, 0, 0]]
    input_ids = torch.tensor(rows)
    mask = (input_ids != 0).long()
    reference = tiny_vlm.language_model.get_input_embeddings()(input_ids).detach().clone()
    for row, ids in enumerate(rows):
        for slot, position in enumerate(i for i, token in enumerate(ids) if token == IMAGE_TOKEN_ID):
            reference[row, position] = visual[row, slot]
    expected = tiny_vlm.language_model(inputs_embeds=reference, attention_mask=mask).logits
    torch.testing.assert_close(tiny_vlm(input_ids, mask, images).logits, expected)

    tiny_vlm(input_ids, mask, images, labels=input_ids).loss.backward()
    assert all(p.grad is not None for p in tiny_vlm.projector.parameters())
    assert all(p.grad is None for p in tiny_vlm.vision.parameters())


def test_slot_count_must_match_the_images(tiny_vlm):
    images = torch.randn(1, 3, 64, 64)
    count = tiny_vlm.image_embeddings(images).shape[1]
    assert count == 4  # a 2x2 feature map
    too_few = torch.tensor([[5] + [IMAGE_TOKEN_ID] * (count - 1)])
    with pytest.raises(
        UserInputError, match=rf"has {count - 1} image-token slots for 1 images of {count} tokens"
    ):
        tiny_vlm(too_few, pixel_values=images)
    with pytest.raises(UserInputError, match="image-token slots but the batch has no images"):
        tiny_vlm(too_few)
    text_only = torch.tensor([[5, 6, 7]])
    torch.testing.assert_close(
        tiny_vlm(text_only).logits, tiny_vlm.language_model(input_ids=text_only).logits
    )


def test_transformers_and_open_clip_encoders_give_tokens(tmp_path):
    from transformers import ViTConfig, ViTModel

    config = ViTConfig(
        hidden_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=64,
        image_size=32,
        patch_size=8,
    )
    ViTModel(config, add_pooling_layer=False).save_pretrained(tmp_path / "vit")
    vit = build_vision_encoder(f"hf:{tmp_path / 'vit'}")
    assert vit.num_features == 32 and vit(torch.zeros(2, 3, 32, 32)).shape == (2, 17, 32)
    clip = build_vision_encoder("open_clip:ViT-B-32", pretrained=False)
    assert clip.num_features == 768 and clip(torch.zeros(1, 3, 224, 224)).shape == (1, 49, 768)
    assert not any(p.requires_grad for p in clip.parameters())
    with pytest.raises(UserInputError, match="open_clip ViT image towers"):
        build_vision_encoder("open_clip:RN50", pretrained=False)


def test_encoders_normalise_with_their_own_statistics():
    efficientnet = build_vision_encoder("test_efficientnet", pretrained=False)
    pixels = torch.rand(1, 3, 64, 64)
    normalised = (pixels - torch.tensor([0.485, 0.456, 0.406])[:, None, None]) / torch.tensor(
        [0.229, 0.224, 0.225]
    )[:, None, None]
    expected = efficientnet.encoder(normalised).flatten(2).transpose(1, 2)
    torch.testing.assert_close(efficientnet(pixels), expected)
    clip = build_vision_encoder("open_clip:ViT-B-32", pretrained=False)
    torch.testing.assert_close(clip.mean.flatten(), torch.tensor([0.48145466, 0.4578275, 0.40821073]))
