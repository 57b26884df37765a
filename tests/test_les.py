import pytest
import torch
import torch.nn as nn

import pipeline.method.les
from helpers import Killed, dies_on_the_second_call
from pipeline.calibration.capture import Budget
from pipeline.infra.checkpoint import Checkpoints
from pipeline.method.les import LESSettings, learn_all, learn_gamma
from pipeline.method.weighting import make_weighting
from pipeline.quant.layers import QuantLayer
from pipeline.quant.quantizers import (
    affine_params,
    fake_quantize,
    part_extrema,
    weight_channel_extrema,
    weight_part_extrema,
)

S, M = 4, 16
OUTLIERS = [3, 17]


def outlier_linear(seed=0):
    """Linear layer whose inputs have two channels 50x larger than the rest, and its FP I/O."""
    torch.manual_seed(seed)
    linear = nn.Linear(32, 16)
    x = torch.randn(S * M, 8, 32)
    x[..., OUTLIERS] *= 50
    with torch.no_grad():
        y = linear(x)
    return QuantLayer(linear, w_bits=4, a_bits=6, num_steps=1, split=None), x.half(), y.half()


def learn(layer, x, y, seed=0, iters=150):
    # lr above the paper's 1e-3 so that few iterations move γ visibly
    return learn_gamma(layer, x, y, S, make_weighting("focal", S), iters=iters, lr=0.05, batch_size=16, seed=seed)


@pytest.fixture(scope="module")
def learned():
    layer, x, y = outlier_linear()
    return layer, x, y, learn(layer, x, y)


def test_les_lowers_loss_and_shrinks_outlier_channels(learned):
    layer, _, _, (gamma, before, after) = learned
    assert after < 0.7 * before
    assert (gamma > 0).all()
    assert (gamma[OUTLIERS] > 1.5 * gamma.median()).all()
    assert torch.equal(layer.gamma, torch.ones(32)) and layer.module.weight.grad is None  # layer left alone


def test_learned_gamma_is_an_equivalence_in_full_precision(learned):
    layer, x, _, (gamma, _, _) = learned
    layer.gamma.copy_(gamma)
    try:
        assert not layer.quantize_weights and not layer.quantize_acts
        with torch.no_grad():
            torch.testing.assert_close(layer(x.float()), layer.module(x.float()), rtol=1e-4, atol=1e-3)
    finally:
        layer.gamma.fill_(1.0)


def test_same_seed_same_gamma(learned):
    layer, x, y, (gamma, _, _) = learned
    assert torch.equal(learn(layer, x, y)[0], gamma)
    assert not torch.equal(learn(layer, x, y, seed=1)[0], gamma)


def output_with_ranges_of_the_scaled_tensors(layer, x, gamma):
    """quantized_output's definition: min-max ranges taken over W · diag(γ) and x / γ themselves."""
    wq, aq, parts = layer.weight_quantizer, layer.act_quantizer, layer.weight_quantizer.parts
    w = layer.scaled_weight(gamma)
    scale, zp = affine_params(*weight_part_extrema(w, parts, wq.num_parts), wq.bits)
    view = (w.shape[0], w.shape[1], *[1] * (w.ndim - 2))
    w_hat = fake_quantize(w, scale[:, parts].view(view), zp[:, parts].view(view), wq.bits, ste=True)
    x = layer.scale_input(x, gamma)
    scale, zp = affine_params(*part_extrema(x, parts, aq.num_parts, layer.channel_dim), aq.bits)
    shape = [1] * x.ndim
    shape[layer.channel_dim] = -1
    x_hat = fake_quantize(x, scale[parts].view(shape), zp[parts].view(shape), aq.bits, ste=True)
    return layer.module_forward(x_hat, w_hat)


@pytest.mark.parametrize("conv", [False, True])
def test_ranges_from_per_channel_extrema_are_those_of_the_scaled_tensors(conv):
    """γ scales the per-channel extrema of W and x to the bit (a positive factor keeps the order of
    floats): the same output, and the same gradient up to the order of float sums."""
    torch.manual_seed(0)
    module = nn.Conv2d(12, 8, 3, padding=1) if conv else nn.Linear(12, 8)
    layer = QuantLayer(module, w_bits=4, a_bits=6, num_steps=1, split=5)
    x = torch.randn(6, 12, 5, 5) if conv else torch.randn(6, 7, 12)
    x.select(layer.channel_dim, 3).mul_(20)  # an outlier channel
    gamma = torch.exp(0.3 * torch.randn(12)).requires_grad_()
    weight_extrema = weight_channel_extrema(layer.module.weight)
    found = pipeline.method.les.quantized_output(layer, x, gamma, weight_extrema)
    expected = output_with_ranges_of_the_scaled_tensors(layer, x, gamma)
    assert torch.equal(found, expected)
    (grad_found,) = torch.autograd.grad(found.pow(2).mean(), gamma)
    (grad_expected,) = torch.autograd.grad(expected.pow(2).mean(), gamma)
    torch.testing.assert_close(grad_found, grad_expected, rtol=1e-5, atol=1e-7)


def test_non_finite_loss_names_layer_and_iteration():
    layer, x, y = outlier_linear()
    x[0, 0, 0] = float("inf")
    with pytest.raises(FloatingPointError, match="LES on my.layer: .* iteration"):
        learn_gamma(
            layer, x, y, S, make_weighting("uniform", S), iters=5, lr=1e-3, batch_size=S * M, seed=0, name="my.layer"
        )


class ThreeLayers(nn.Module):
    """A conv, a linear on its positions and a 1x1 conv (split input channels), called in that order."""

    def __init__(self):
        super().__init__()
        self.down, self.attn, self.up = nn.Module(), nn.Module(), nn.Module()
        self.down.conv = nn.Conv2d(8, 8, 3, padding=1)
        self.attn.to_q = nn.Linear(8, 8)
        self.up.conv1 = nn.Conv2d(8, 4, 1)

    def forward(self, x, t):
        h = self.down.conv(x)
        q = self.attn.to_q(h.flatten(2).transpose(1, 2))
        return self.up.conv1(h + q.transpose(1, 2).reshape(h.shape))


@pytest.fixture
def three_layers():
    """Three quantized layers, the FP model they come from and its calibration records (x, t)."""
    torch.manual_seed(0)
    fp = ThreeLayers().eval()
    fp_layers = {"down.conv": fp.down.conv, "attn.to_q": fp.attn.to_q, "up.conv1": fp.up.conv1}
    splits = {"up.conv1": 5}  # one split layer: two parts of input channels
    layers = {name: QuantLayer(m, 4, 8, 1, splits.get(name)) for name, m in fp_layers.items()}
    records = (torch.randn(S * M, 8, 4, 4), torch.zeros(S * M, dtype=torch.long))
    return layers, (fp, fp_layers, records, S)


BIG = Budget.of(1.0, 1.0)
LEARN = dict(settings=LESSettings("focal", iters=10, lr=1e-2, batch_size=8, seed=3), budget=BIG)


def test_windows_and_where_captures_live_do_not_change_gamma(three_layers, tmp_path):
    """One layer per window, captures spilled to memory-mapped scratch files: γ as with everything in memory."""
    layers, store = three_layers
    expected = learn_all(layers, *store, **LEARN)
    spilled = learn_all(layers, *store, **{**LEARN, "budget": Budget(0, 0, str(tmp_path))})
    assert spilled[1] == expected[1]
    for name in layers:
        assert torch.equal(spilled[0][name], expected[0][name]), name
    assert list(tmp_path.iterdir()) == []  # scratch files removed


def test_a_layer_learns_from_its_fp_io_on_the_records(three_layers):
    """learn_all captures exactly what learn_gamma needs: a layer's FP input and output on every record."""
    layers, (fp, fp_layers, (x, t), steps) = three_layers
    with torch.no_grad():
        h = fp.down.conv(x).flatten(2).transpose(1, 2).contiguous()  # as captured
        y = fp.attn.to_q(h)
    gammas, losses = learn_all(layers, fp, fp_layers, (x, t), steps, **LEARN)
    s = LEARN["settings"]
    kwargs = dict(iters=s.iters, lr=s.lr, batch_size=s.batch_size, seed=s.seed)
    weighting = make_weighting(s.weighting, steps, s.r, s.momentum)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as learn_all runs every layer
    try:
        gamma, before, after = learn_gamma(layers["attn.to_q"], h, y, steps, weighting, name="attn.to_q", **kwargs)
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(gammas["attn.to_q"], gamma) and losses["attn.to_q"] == (before, after)


def test_workers_do_not_change_gamma(three_layers):
    layers, store = three_layers
    g1, l1 = learn_all(layers, *store, workers=1, **LEARN)
    g2, l2 = learn_all(layers, *store, workers=2, **LEARN)
    assert list(g1) == list(g2) == list(layers)
    for name in layers:
        assert torch.equal(g1[name], g2[name]), name
        assert not torch.equal(g1[name], torch.ones(8)), name
    assert l1 == l2


@pytest.mark.parametrize("workers", [1, 2])
def test_resumed_run_skips_finished_layers_and_equals_an_uninterrupted_one(
    three_layers, tmp_path, monkeypatch, workers
):
    layers, store = three_layers
    uninterrupted = learn_all(layers, *store, workers=workers, **LEARN)
    real_job, learned = pipeline.method.les._learn_captured, []

    with monkeypatch.context() as patch:
        patch.setattr(pipeline.method.les, "_learn_captured", dies_on_the_second_call(real_job, learned))
        with pytest.raises(Killed):
            learn_all(layers, *store, workers=1, checkpoints=Checkpoints(tmp_path / "ckpt", "key"), **LEARN)
    assert Checkpoints(tmp_path / "ckpt", "key").done() == learned
    first = (tmp_path / "ckpt/key" / f"{learned[0]}.safetensors").stat()

    resumed = learn_all(layers, *store, workers=workers, checkpoints=Checkpoints(tmp_path / "ckpt", "key"), **LEARN)
    again = (tmp_path / "ckpt/key" / f"{learned[0]}.safetensors").stat()
    assert (again.st_ino, again.st_mtime_ns) == (first.st_ino, first.st_mtime_ns)  # restored, not learned again
    assert Checkpoints(tmp_path / "ckpt", "key").done() == sorted(layers)
    assert resumed[1] == uninterrupted[1]
    for name in layers:
        assert torch.equal(resumed[0][name], uninterrupted[0][name]), name


def test_checkpoints_of_other_params_are_never_reused(three_layers, tmp_path):
    layers, store = three_layers
    old = Checkpoints(tmp_path / "ckpt", "old-params")
    old.save("down.conv", {"gamma": torch.full((8,), 7.0)}, {"before": 1.0, "after": 0.5})
    gammas, _ = learn_all(layers, *store, checkpoints=Checkpoints(tmp_path / "ckpt", "new-params"), **LEARN)
    assert not torch.equal(gammas["down.conv"], torch.full((8,), 7.0))
    assert [p.name for p in (tmp_path / "ckpt").iterdir()] == ["new-params"]


def test_a_damaged_checkpoint_is_redone(three_layers, tmp_path):
    layers, store = three_layers
    expected, _ = learn_all(layers, *store, checkpoints=Checkpoints(tmp_path / "ckpt", "key"), **LEARN)
    (tmp_path / "ckpt/key/attn.to_q.safetensors").write_bytes(b"garbage")
    gammas, _ = learn_all(layers, *store, checkpoints=Checkpoints(tmp_path / "ckpt", "key"), **LEARN)
    assert all(torch.equal(gammas[name], expected[name]) for name in layers)
    assert Checkpoints(tmp_path / "ckpt", "key").load("attn.to_q") is not None  # learned again and saved


def test_checkpoint_key_ignores_the_number_of_workers_and_the_other_seeds_only():
    from pipeline.config import Variant, parse_config
    from stages.lineage import checkpoint_key, stage_provenance

    dmq = Variant("dmq", 4, 6)

    def key(quant_seed=0, seeds=(0, 1, 2), **les):
        cfg = parse_config({"les": les, "quant": {"seeds": list(seeds)}})
        return checkpoint_key(stage_provenance(cfg, "les", "model", dmq, quant_seed))

    assert key(workers=1) == key(workers=8)
    assert key(seeds=(0, 1)) == key(seeds=(0, 1, 2, 3))  # the seed list says which runs there are
    assert key(iters=10) != key(iters=11) and key(quant_seed=0) != key(quant_seed=1)
    assert key() != checkpoint_key(stage_provenance(parse_config({}), "les", "other-model", dmq))
    assert key() != checkpoint_key(stage_provenance(parse_config({}), "les", "model", dmq._replace(a_bits=8)))
