"""benchmarks/seed_graph.py times both ways of learning an entry's quantization seeds; the timing means
something only if the two ways learn the same thing: one graph must give each seed what learning it
alone gives (up to float rounding: a grouped convolution sums in another order)."""

import importlib.util

import pytest
import torch

from helpers import ROOT


@pytest.fixture(scope="module")
def seed_graph():
    spec = importlib.util.spec_from_file_location("seed_graph", ROOT / "benchmarks/seed_graph.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize(
    "learner, unit", [("adaround", "down_blocks.1.resnets.0"), ("les", "up_blocks.0.resnets.0.conv_shortcut")]
)
def test_one_graph_learns_what_each_seed_learns_alone(seed_graph, tiny_unet, learner, unit):
    tiny_unet.requires_grad_(False)
    start, loss, records, lr = seed_graph.problem(tiny_unet, learner, unit)
    batches = torch.randint(0, seed_graph.RECORDS, (3, 4, seed_graph.BATCH), generator=torch.Generator().manual_seed(0))
    alone = seed_graph.one_after_another(start, loss, records, batches, lr)
    together = seed_graph.one_graph(start, loss, records, batches, lr)
    for name, learned in alone.items():
        moved = (learned - start[name]).abs().amax()
        assert moved > 0
        assert (together[name] - learned).abs().amax() < 0.02 * moved  # each seed's own batches, its own result
        assert (learned[0] - learned[1]).abs().amax() > 0.1 * moved  # the seeds' batches differ, so do they
