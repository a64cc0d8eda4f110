"""LinearMultiheadAttention against torch's nn.MultiheadAttention (outputs and gradients), and
adapters on open_clip's attention through `inject`."""

import copy

import pytest
import torch
from torch import nn

from lightning_moe.adapters import AdapterRule, LoraConfig, MoEConfig, adapted_layers, inject
from lightning_moe.adapters.attention import LinearMultiheadAttention
from lightning_moe.adapters.errors import AdapterConfigError
from tests.tiny import randomize_adapters
from tests.tolerances import assert_same_maths

# Same maths as torch's attention through other kernels (SDPA, fused projection): compared in
# float64 (see assert_same_maths), so the CPU's choice of kernels cannot matter.
WIDTH, HEADS = 16, 4


def attention_pair(
    batch_first: bool, dropout: float = 0.0
) -> tuple[nn.MultiheadAttention, LinearMultiheadAttention]:
    torch.manual_seed(0)
    reference = nn.MultiheadAttention(
        WIDTH, HEADS, dropout=dropout, batch_first=batch_first, dtype=torch.float64
    )
    with torch.no_grad():
        reference.in_proj_bias.normal_()
        reference.out_proj.bias.normal_()
    return reference, LinearMultiheadAttention(reference)


def inputs(batch_first: bool, cross: bool, batch: int = 3, length: int = 5, source: int = 6):
    generator = torch.Generator().manual_seed(1)

    def make(n):
        shape = (batch, n, WIDTH) if batch_first else (n, batch, WIDTH)
        return torch.randn(shape, generator=generator, dtype=torch.float64, requires_grad=True)

    query = make(length)
    if not cross:
        return query, query, query
    memory = make(source)
    return query, memory, memory


def masks(kind: str, length: int, source: int, batch: int = 3):
    if kind == "none":
        return {}
    if kind == "causal_bool":
        return {"attn_mask": torch.ones(length, source, dtype=torch.bool).triu(1)}
    if kind == "float_per_head":
        return {
            "attn_mask": torch.randn(
                batch * HEADS, length, source, generator=torch.Generator().manual_seed(2), dtype=torch.float64
            )
        }
    padding = torch.zeros(batch, source, dtype=torch.bool)
    padding[0, -2:] = True
    return {"key_padding_mask": padding}


def gradients(module: nn.Module, tensors) -> list[torch.Tensor]:
    parameters = [p for p in module.parameters() if p.requires_grad]
    return [g for g in torch.autograd.grad(tensors[0], [*tensors[1:], *parameters], tensors[0].new_ones(()))]


@pytest.mark.parametrize("batch_first", [True, False])
@pytest.mark.parametrize("cross", [False, True])
@pytest.mark.parametrize("mask", ["none", "causal_bool", "float_per_head", "key_padding"])
@pytest.mark.parametrize("need_weights", [False, True])
def test_same_outputs_weights_and_gradients_as_torch(batch_first, cross, mask, need_weights):
    reference, ours = attention_pair(batch_first)
    query, key, value = inputs(batch_first, cross)
    length, source = (5, 6) if cross else (5, 5)
    options = masks(mask, length, source) | {"need_weights": need_weights}
    expected, expected_weights = reference(query, key, value, **options)
    got, got_weights = ours(query, key, value, **options)
    assert_same_maths(got, expected)
    if need_weights:
        assert_same_maths(got_weights, expected_weights)
    else:
        assert got_weights is None
    leaves = [query] if not cross else [query, key]
    for ours_grad, reference_grad in zip(
        gradients(ours, [(got**2).sum(), *leaves]),
        gradients(reference, [(expected**2).sum(), *leaves]),
        strict=True,
    ):
        assert_same_maths(ours_grad, reference_grad)


def test_unbatched_input_and_per_head_weights():
    reference, ours = attention_pair(batch_first=True)
    x = torch.randn(5, WIDTH, dtype=torch.float64)
    expected, expected_weights = reference(x, x, x, average_attn_weights=False)
    got, got_weights = ours(x, x, x, average_attn_weights=False)
    assert_same_maths(got, expected)
    assert_same_maths(got_weights, expected_weights)
    assert got_weights.shape == (HEADS, 5, 5)


def test_it_shares_the_parameters_and_drops_out_only_in_training():
    reference, ours = attention_pair(batch_first=True, dropout=0.5)
    assert ours.in_proj.weight is reference.in_proj_weight and ours.out_proj is reference.out_proj
    x = torch.randn(2, 5, WIDTH, dtype=torch.float64)
    ours.eval()
    assert_same_maths(ours(x, x, x)[0], reference.eval()(x, x, x)[0])
    ours.train()
    assert not torch.allclose(ours(x, x, x, need_weights=False)[0], ours(x, x, x, need_weights=False)[0])


def test_unsupported_attention_is_refused():
    with pytest.raises(AdapterConfigError, match="one packed in-projection"):
        LinearMultiheadAttention(nn.MultiheadAttention(WIDTH, HEADS, kdim=8, vdim=8))


ATTENTION_AND_MLP = ["attn.in_proj", "attn.out_proj", "mlp.c_fc", "mlp.c_proj"]


def encode(model, images, tokens):
    return model.encode_image(images), model.encode_text(tokens)


def test_lora_on_open_clip_attention_equals_the_merged_weights(make_clip):
    model = make_clip().double()
    reference = copy.deepcopy(model)
    images = torch.randn(2, 3, 16, 16, dtype=torch.float64)
    tokens = torch.randint(0, 50, (2, 8))
    before = encode(model, images, tokens)
    report = inject(model, [AdapterRule(targets=ATTENTION_AND_MLP, adapter=LoraConfig(rank=2))])
    assert sum(name.endswith("attn.in_proj") for name in report.adapted) == 2  # one per tower
    for got, expected in zip(encode(model, images, tokens), before, strict=True):  # B = 0: no change yet
        assert_same_maths(got, expected)
    randomize_adapters(model)
    # the reference: torch's own attention with every update added to the weights it reads
    with torch.no_grad():
        for name, layer in adapted_layers(model):
            owner, _, projection = name.rpartition(".")
            target = reference.get_submodule(owner)
            weight = target.in_proj_weight if projection == "in_proj" else getattr(target, projection).weight
            weight += layer._delta_weight()
    for got, expected in zip(encode(model, images, tokens), encode(reference, images, tokens), strict=True):
        assert_same_maths(got, expected)


def test_moe_experts_on_open_clip_attention_train(make_clip):
    model = make_clip().train()
    inject(model, [AdapterRule(targets=["attn.in_proj"], adapter=MoEConfig(rank=2, num_experts=2))])
    randomize_adapters(model)
    image_features = model.encode_image(torch.randn(2, 3, 16, 16))
    image_features.square().sum().backward()
    trained = [name for name, p in model.named_parameters() if p.grad is not None]
    assert trained and all(".adapter." in name for name in trained)
    assert any("visual" in name and "attn.in_proj" in name for name in trained)


def test_a_failed_injection_puts_torch_attention_back(make_clip):
    model = make_clip()
    with pytest.raises(AdapterConfigError, match="matched no module"):
        inject(model, [AdapterRule(targets=["attn.in_proj", "no_such_layer"], adapter=LoraConfig(rank=2))])
    assert isinstance(model.visual.transformer.resblocks[0].attn, nn.MultiheadAttention)
    with pytest.raises(AdapterConfigError, match=r"a MultiheadAttention.*'attn\.in_proj', 'attn\.out_proj'"):
        inject(model, [AdapterRule(targets=["attn"], adapter=LoraConfig(rank=2))])
