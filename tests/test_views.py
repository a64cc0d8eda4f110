"""What a person reads: the routing summary and its figure, the before/after table, the
TensorBoard layout."""

import math
import re

import pytest
import torch

from lightning_moe.adapters.aux_losses import LayerRoutingStats, routing_statistics
from lightning_moe.adapters.routing import RoutingRecord
from lightning_moe.callbacks import before_after_markdown
from lightning_moe.routing_logging import load_figure, routing_summary, short_names, summary_line
from lightning_moe.tensorboard_views import LAYOUT, charts_for, custom_scalars, markdown_table


def record(layer: str, logits: torch.Tensor) -> RoutingRecord:
    """A top-1 routing record of [batch, tokens, experts] logits."""
    return RoutingRecord(layer, logits, logits.argmax(-1, keepdim=True))


def test_summary_of_uniform_and_of_collapsed_routing():
    tokens = torch.arange(8) % 4  # every expert chosen twice
    uniform = torch.zeros(1, 8, 4)
    uniform[0, torch.arange(8), tokens] = 1e-6  # argmax spreads, probabilities stay uniform
    collapsed = torch.full((1, 8, 4), -30.0)
    collapsed[..., 2] = 30.0  # every token certain, all on expert 2
    stats = routing_statistics(
        {name: record(name, logits) for name, logits in [("a.uniform", uniform), ("a.collapsed", collapsed)]}
    )
    summary = routing_summary(stats)
    # entropy / log E: 1 for the uniform layer, 0 for the certain one -> mean 0.5
    assert summary["entropy"] == pytest.approx(0.5, abs=1e-5)
    # the collapsed layer's busiest expert takes 4x its fair share
    assert summary["max_load"] == pytest.approx(4.0)
    assert summary["dead_experts"] == 3 and summary["experts"] == 8
    assert summary_line(summary) == (
        "routing: entropy 0.50 of uniform, busiest expert 4.00x its fair share, 3 of 8 experts got no token"
    )


def test_layer_names_lose_only_their_shared_prefix():
    names = ["model.layers.0.mlp.up_proj", "model.layers.1.mlp.down_proj"]
    assert short_names(names) == ["0.mlp.up_proj", "1.mlp.down_proj"]
    assert short_names(["lm_head"]) == ["lm_head"]


def test_the_load_figure_puts_blocks_down_and_projection_experts_across():
    def stats(load: list[float], entropy: float) -> LayerRoutingStats:
        return LayerRoutingStats(torch.tensor(load), entropy * math.log(len(load)), load.count(0.0))

    loads = {
        "model.layers.0.mlp.up_proj": stats([0.7, 0.1, 0.1, 0.1], 0.5),
        "model.layers.0.mlp.down_proj": stats([0.25, 0.25, 0.25, 0.25], 1.0),
        "model.layers.1.mlp.up_proj": stats([0.0, 0.5, 0.5], 0.25),  # fewer experts, no down_proj
    }
    figure = load_figure(loads, step=12)
    load, entropy = figure.axes[:2]
    assert [t.get_text() for t in load.get_yticklabels()] == ["0", "1"] and load.get_ylabel() == "block"
    assert [t.get_text() for t in load.get_xticklabels()] == ["0", "1", "2", "3"] * 2
    assert load.get_xlabel() == "expert" and "step 12" in load.get_title()
    (projections,) = load.child_axes
    assert [t.get_text() for t in projections.get_xticklabels()] == ["up_proj", "down_proj"]
    cells = load.get_images()[0].get_array()
    assert list(cells[0]) == pytest.approx([70, 10, 10, 10, 25, 25, 25, 25])
    assert list(cells[1, :3]) == pytest.approx([0, 50, 50]) and cells.mask[1, 3:].all()
    assert [t.get_text() for t in entropy.get_xticklabels()] == ["up_proj", "down_proj"]
    grid = entropy.get_images()[0].get_array()
    assert (
        list(grid[0]) == pytest.approx([0.5, 1.0]) and grid[1, 0] == pytest.approx(0.25) and grid.mask[1, 1]
    )
    bars = [axes.get_ylabel() for axes in figure.axes[2:]]
    assert bars == ["share of the layer's tokens (%)", "1 = uniform, 0 = certain"]


def test_before_after_table_gives_the_noise_of_a_share():
    table = before_after_markdown(
        ["val/strict_match", "val/loss"],
        {"val/strict_match": 0.1, "val/loss": 2.0},
        {"val/strict_match": 0.5},
        100,
    )
    header, _, match, loss = table.splitlines()
    assert header.endswith("noise (2 s.e., n=100) |")
    noise = 2 * math.sqrt((0.1 * 0.9 + 0.5 * 0.5) / 100)
    assert match == f"| val/strict_match | 0.1000 | 0.5000 | +0.4000 | ± {noise:.4f} |"
    assert loss == "| val/loss | 2.0000 | not measured |  |  |"


def test_markdown_cells_keep_their_table_shape():
    table = markdown_table(["a", "b"], [["x | y", "two\nlines"]])
    assert table.splitlines()[2] == "| x \\| y | two ⏎ lines |"


def test_every_layout_chart_is_a_multiline_chart_of_valid_regexes():
    layout = custom_scalars(LAYOUT)
    assert list(layout) == ["losses", "routing", "scores"]
    for charts in layout.values():
        for kind, patterns in charts.values():
            assert kind == "Multiline" and patterns
            for pattern in patterns:
                re.compile(pattern)
    scores = LAYOUT["scores"]["validation"][0]
    assert re.fullmatch(scores, "val/strict_match") and re.fullmatch(scores, "val/accuracy/digits")
    assert not re.fullmatch(scores, "val/loss") and not re.fullmatch(scores, "val/balance_loss")


def test_the_layout_leaves_out_charts_the_run_logs_nothing_for():
    first_step = ["train/loss", "train/task_loss", "train/balance_loss", "train/z_loss", "routing/entropy"]
    layout = charts_for(LAYOUT, first_step)
    assert "gate label loss (MeteoRA)" not in layout["losses"]
    assert {"training loss (task plus router terms)", "router z-loss", "validation loss"} <= set(
        layout["losses"]
    )
    assert list(layout["routing"]) == ["router entropy (1 = uniform, 0 = certain)"]
    assert list(layout["scores"]) == ["validation"]  # its tags come with the first validation
    assert "routing" not in charts_for(LAYOUT, ["train/loss"])  # a run without routers
