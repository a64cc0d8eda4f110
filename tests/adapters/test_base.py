"""The adapter protocol holds its promise: a kind defined in one file (here, in this test) works
everywhere, YAML rules, injection, merging, adapter folders, optimiser groups and task
boundaries, without a line elsewhere (docs/architecture.md, "adding an adapter kind")."""

from dataclasses import dataclass
from typing import ClassVar

import pytest
import torch
from torch import nn
from torch.nn import functional as F

from lightning_moe.adapters import (
    ADAPTER_KINDS,
    Adapter,
    AdapterConfig,
    AdapterConfigError,
    AdapterRule,
    end_task,
    inject,
    load_adapter,
    merge_adapters,
    register_adapter,
    save_adapter,
    unmerge_adapters,
)
from lightning_moe.tasks.reasoning import CausalLMTask
from tests.tiny import TINY_LLAMA, build_llama
from tests.tolerances import assert_same_maths


@dataclass
class OutputScaleConfig(AdapterConfig):
    """A kind made up for this test: the rank-1 update scale * gain (x) direction, a learnt
    per-output gain along a fixed random input direction.

    Args:
        scale: Multiplies the update.
    """

    kind: ClassVar[str] = "test_output_scale"
    scale: float = 1.0

    def __post_init__(self) -> None:
        if self.scale <= 0:
            raise AdapterConfigError(f"scale must be > 0, got scale={self.scale}")


class OutputScaleAdapter(Adapter):
    config_class = OutputScaleConfig
    task_record = "test_output_scale_tasks"

    def __init__(self, base_layer: nn.Linear, config: OutputScaleConfig) -> None:
        super().__init__(base_layer, config)
        dtype = base_layer.weight.dtype
        self.register_buffer("direction", torch.randn(base_layer.in_features, dtype=dtype))
        self.gain = nn.Parameter(torch.zeros(base_layer.out_features, dtype=dtype))
        self.register_buffer("tasks_ended", torch.zeros((), dtype=torch.long))

    @property
    def mergeable(self) -> bool:
        return True

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.delta_weight())

    def delta_weight(self) -> torch.Tensor:
        return self.config.scale * self.gain[:, None] * self.direction[None, :]

    def router_parameters(self) -> list[nn.Parameter]:
        return [self.gain]  # to see the declaration reach the optimiser groups

    def end_task(self) -> int:
        self.tasks_ended += 1
        return int(self.tasks_ended)


@pytest.fixture
def new_kind():
    register_adapter(OutputScaleAdapter)
    yield "test_output_scale"
    del ADAPTER_KINDS["test_output_scale"]


def test_a_new_kind_is_a_rule_with_checked_options(new_kind):
    rule = AdapterRule(["mlp.up_proj"], {"kind": new_kind, "scale": 2.0})
    assert isinstance(rule.config, OutputScaleConfig) and rule.config.scale == 2.0
    assert AdapterRule.from_dict(rule.to_dict()).config == rule.config
    with pytest.raises(AdapterConfigError, match="has no option 'scael'; did you mean 'scale'"):
        AdapterRule(["mlp.up_proj"], {"kind": new_kind, "scael": 2.0})
    with pytest.raises(AdapterConfigError, match="scale must be > 0"):
        AdapterRule(["mlp.up_proj"], {"kind": new_kind, "scale": 0.0})


def test_a_new_kind_injects_merges_saves_and_ends_tasks(new_kind, tmp_path):
    model = build_llama(dtype=torch.float64)
    base = build_llama(dtype=torch.float64)
    rules = [AdapterRule(["mlp.up_proj"], {"kind": new_kind, "scale": 2.0})]
    report = inject(model, rules)
    assert set(report.adapted.values()) == {new_kind}
    layer = model.model.layers[0].mlp.up_proj
    with torch.no_grad():
        layer.adapter.gain.normal_()
    x = torch.randn(3, layer.in_features, dtype=torch.float64)
    update = 2.0 * layer.adapter.gain[:, None] * layer.adapter.direction[None, :]
    expected = x @ (layer.base_layer.weight + update).T
    assert_same_maths(layer(x), expected.detach())
    input_ids = torch.randint(0, 64, (2, 5))
    unmerged = model(input_ids).logits.detach()
    merge_adapters(model)
    assert_same_maths(model(input_ids).logits.detach(), unmerged)
    unmerge_adapters(model)
    assert end_task(model)["test_output_scale_tasks"] == {
        f"model.layers.{i}.mlp.up_proj": 1 for i in range(2)
    }
    save_adapter(model, rules, tmp_path / "adapter")
    load_adapter(base, tmp_path / "adapter")
    assert_same_maths(base(input_ids).logits.detach(), unmerged)
    assert int(base.model.layers[1].mlp.up_proj.adapter.tasks_ended) == 1  # buffers travel too


def test_a_new_kind_declares_its_optimiser_group(new_kind):
    rules = [AdapterRule(["mlp.up_proj"], {"kind": new_kind})]
    task = CausalLMTask(model_config=dict(TINY_LLAMA), adapters=rules, router_lr=0.5)
    task.configure_model()
    groups = {group["name"]: group for group in task.configure_optimizers().param_groups}
    assert set(groups) == {"routers"} and groups["routers"]["lr"] == 0.5
    assert len(groups["routers"]["params"]) == TINY_LLAMA["num_hidden_layers"]
