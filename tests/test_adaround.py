import copy
from contextlib import contextmanager

import pytest
import torch
import torch.nn as nn

import pipeline.method.adaround
from helpers import Killed, TwoConvs, dies_on_the_second_call
from pipeline.calibration.capture import GB, Budget, placement, unit_inputs, unit_outputs
from pipeline.infra.checkpoint import Checkpoints
from pipeline.method.adaround import (
    AdaRoundSettings,
    adaround,
    beta_at,
    reconstruct_unit,
    rounding_state,
)
from pipeline.method.weight_init import init_weight_quantizers
from pipeline.quant import QuantSpec, quantize


def test_learned_rounding_beats_nearest_and_ends_on_the_grid():
    torch.manual_seed(0)
    fp = TwoConvs().eval()
    q = copy.deepcopy(fp)
    layers = quantize(q, QuantSpec(w_bits=3, split=()))
    init_weight_quantizers(layers, grid=20, p=2.4)
    x = torch.randn(96, 4, 8, 8)
    t = torch.zeros(96, dtype=torch.long)
    with torch.no_grad():
        nearest_error = (q(x, t) - fp(x, t)).pow(2).mean().item()
    settings = AdaRoundSettings(
        iters=400, lr=1e-2, batch_size=32, reg_lambda=0.01, beta_start=20, beta_end=2, warmup=0.2, seed=0
    )
    report = adaround(q, fp, (x, t), settings)
    assert set(report) == {"a", "b"}
    assert all(r["after"] < r["before"] for r in report.values())
    with torch.no_grad():
        learned_error = (q(x, t) - fp(x, t)).pow(2).mean().item()
    assert learned_error < 0.9 * nearest_error
    for layer in layers.values():
        wq = layer.weight_quantizer
        ints = wq.to_integer(layer.scaled_weight())
        assert torch.equal(ints, ints.round()) and ints.min() >= 0 and ints.max() <= 7
        # the weight the layer uses is exactly dequantized integers
        scale, zp = wq.channel_params(4)
        torch.testing.assert_close(wq(layer.scaled_weight()), (ints - zp) * scale)
        offsets = wq.rounding.hard_offset()
        assert set(offsets.unique().tolist()) <= {0.0, 1.0}


class ThreeConvs(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Conv2d(4, 8, 3, padding=1)
        self.b = nn.Conv2d(8, 8, 3, padding=1)
        self.c = nn.Conv2d(8, 4, 3, padding=1)

    def forward(self, x, t):
        return self.c(torch.relu(self.b(torch.relu(self.a(x)))))


def test_resumed_reconstruction_equals_an_uninterrupted_one(tmp_path, monkeypatch):
    """Units depend on the units before them: a run killed after unit a and resumed in a fresh
    process (a fresh quantized model) must restore a's rounding exactly and end bit-identical."""
    torch.manual_seed(0)
    fp = ThreeConvs().eval()
    x, t = torch.randn(48, 4, 8, 8), torch.zeros(48, dtype=torch.long)
    settings = AdaRoundSettings(
        iters=60, lr=1e-2, batch_size=16, reg_lambda=0.01, beta_start=20, beta_end=2, warmup=0.2, seed=0
    )

    def fresh():
        q = copy.deepcopy(fp)
        layers = quantize(q, QuantSpec(w_bits=3, split=()))
        init_weight_quantizers(layers, grid=20, p=2.4)
        return q, layers

    def integers(layers):
        return {name: layer.integer_weight() for name, layer in layers.items()}

    q, layers = fresh()
    uninterrupted = adaround(q, fp, (x, t), settings)
    expected = integers(layers)

    real_unit, reconstructed = pipeline.method.adaround.reconstruct_unit, []

    with monkeypatch.context() as patch:
        patch.setattr(pipeline.method.adaround, "reconstruct_unit", dies_on_the_second_call(real_unit, reconstructed))
        with pytest.raises(Killed):
            adaround(*fresh()[:1], fp, (x, t), settings, checkpoints=Checkpoints(tmp_path, "key"))
    assert Checkpoints(tmp_path, "key").done() == ["a"]

    def counted(name, *args, **kwargs):
        reconstructed.append(name)
        return real_unit(name, *args, **kwargs)

    monkeypatch.setattr(pipeline.method.adaround, "reconstruct_unit", counted)
    q, layers = fresh()
    resumed = adaround(q, fp, (x, t), settings, checkpoints=Checkpoints(tmp_path, "key"))
    assert reconstructed == ["a", "b", "c"]  # a once, before the kill; b and c after it
    assert resumed == uninterrupted
    for name, ints in integers(layers).items():
        assert torch.equal(ints, expected[name]), name


class TupleBlock(nn.Module):
    """A unit called with a keyword argument that returns a tuple, like diffusers' Transformer2DModel."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(4, 4, 3, padding=1)

    def forward(self, x, scale=1.0):
        return (self.conv(x) * scale,)


class WithTupleBlock(nn.Module):
    def __init__(self):
        super().__init__()
        self.block = TupleBlock()

    def forward(self, x, t):
        return self.block(x, scale=2.0)[0]


def test_reconstruction_does_not_depend_on_the_capture_batches():
    """Captures come in batches; a unit learns from all records, however they were batched."""
    torch.manual_seed(0)
    fp = WithTupleBlock().eval()
    x, t = torch.randn(96, 4, 8, 8), torch.zeros(96, dtype=torch.long)
    settings = AdaRoundSettings(
        iters=30, lr=1e-2, batch_size=16, reg_lambda=0.01, beta_start=20, beta_end=2, warmup=0.2, seed=0
    )
    results = []
    for capture_batch in (16, 96):
        q = copy.deepcopy(fp)
        init_weight_quantizers(quantize(q, QuantSpec(w_bits=3, split=())), grid=20, p=2.4)
        with placement(Budget(GB, 0), torch.device("cpu")) as allocate:
            q_inputs = unit_inputs(q, q.block, (x, t), capture_batch, allocate)
            fp_outputs = unit_outputs(fp, {"block": fp.block}, (x, t), capture_batch, allocate)["block"]
            report = reconstruct_unit("block", q.block, q_inputs, fp_outputs, settings)
        results.append((report, rounding_state(q.block)["conv"].clone()))
    (report_a, v_a), (report_b, v_b) = results
    assert report_a == report_b
    assert torch.equal(v_a, v_b)


def test_fp_targets_of_several_units_from_one_pass_equal_one_pass_per_unit(monkeypatch):
    """The FP targets of consecutive units are captured together within a memory budget; a budget of
    one unit per pass, whose captures all spill to memory-mapped scratch files, must end bit-identical."""
    torch.manual_seed(0)
    fp = ThreeConvs().eval()
    x, t = torch.randn(48, 4, 8, 8), torch.zeros(48, dtype=torch.long)
    settings = AdaRoundSettings(
        iters=30, lr=1e-2, batch_size=16, reg_lambda=0.01, beta_start=20, beta_end=2, warmup=0.2, seed=0
    )
    real_capture, passes = pipeline.method.adaround.unit_outputs, []

    def counted(model, units, *args):
        passes.append(list(units))
        return real_capture(model, units, *args)

    monkeypatch.setattr(pipeline.method.adaround, "unit_outputs", counted)
    results = []
    scratch = []
    real_placement = pipeline.method.adaround.placement

    @contextmanager
    def watched(budget, device):
        with real_placement(budget, device) as allocate:
            yield allocate
            scratch.append(allocate.files)

    monkeypatch.setattr(pipeline.method.adaround, "placement", watched)
    for budget in (Budget(2 * GB, 0), Budget(0, 2)):
        passes.clear()
        scratch.clear()
        q = copy.deepcopy(fp)
        layers = quantize(q, QuantSpec(w_bits=3, split=()))
        init_weight_quantizers(layers, grid=20, p=2.4)
        report = adaround(q, fp, (x, t), settings, budget=budget)
        ints = {name: layer.integer_weight() for name, layer in layers.items()}
        results.append((report, ints, passes[1:], scratch[1:]))  # after the one-record sizing pass
    (report_a, ints_a, passes_a, scratch_a), (report_b, ints_b, passes_b, scratch_b) = results
    assert passes_a == [["a", "b", "c"]] and passes_b == [["a"], ["b"], ["c"]]
    assert len(scratch_a) == 4 and not any(scratch_a)  # in memory
    assert len(scratch_b) == 6 and all(scratch_b)  # every capture in memory-mapped scratch files
    assert report_a == report_b
    assert all(torch.equal(ints_a[name], ints_b[name]) for name in ints_a)


def test_beta_counts_iterations_from_one_as_the_reference():
    """β is off until t = i + 1 reaches the warm-up (20 % of 400: t = 80), then falls from 20 to exactly 2."""
    settings = AdaRoundSettings(
        iters=400, batch_size=32, lr=1e-3, reg_lambda=0.01, beta_start=20.0, beta_end=2.0, warmup=0.2, seed=0
    )
    assert beta_at(78, settings) is None and beta_at(79, settings) == 20.0
    assert beta_at(399, settings) == 2.0
