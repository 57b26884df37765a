import pytest
import torch

from pipeline.quant.quantizers import ActQuantizer, WeightQuantizer, affine_params, fake_quantize, search_weight_params


def reference_quantize(x, lo, hi, bits):
    """Textbook asymmetric quantization, written out independently of the library."""
    lo, hi = min(lo, 0.0), max(hi, 0.0)
    scale = (hi - lo) / (2**bits - 1)
    zero_point = round(-lo / scale)
    q = [min(max(round(v / scale) + zero_point, 0), 2**bits - 1) for v in x.tolist()]
    return torch.tensor([(qi - zero_point) * scale for qi in q]), scale, zero_point


@pytest.mark.parametrize("bits", [2, 4, 8])
def test_fake_quantize_matches_reference_and_grid(bits):
    torch.manual_seed(bits)
    x = torch.randn(500) * 3 + 0.7
    lo, hi = -2.0, 5.0
    scale, zp = affine_params(torch.tensor(lo), torch.tensor(hi), bits)
    expected, ref_scale, ref_zp = reference_quantize(x, lo, hi, bits)
    assert scale.item() == pytest.approx(ref_scale)
    assert zp.item() == ref_zp
    got = fake_quantize(x, scale, zp, bits)
    torch.testing.assert_close(got, expected.float(), atol=1e-5, rtol=0)
    levels = got / scale + zp
    torch.testing.assert_close(levels, levels.round(), atol=1e-4, rtol=0)  # on the integer grid
    assert levels.min() >= 0 and levels.max() <= 2**bits - 1
    inside = (x >= lo) & (x <= hi)
    assert (got[inside] - x[inside]).abs().max() <= scale / 2 + 1e-6  # rounding error <= Δ/2 in range
    assert got.max() <= hi + scale / 2 and got.min() >= lo - scale / 2  # clipping outside


def test_zero_is_exact_and_zero_range_does_not_divide_by_zero():
    scale, zp = affine_params(torch.tensor(0.3), torch.tensor(2.0), 4)  # range widened to include 0
    assert fake_quantize(torch.tensor(0.0), scale, zp, 4).item() == 0.0
    scale, zp = affine_params(torch.tensor(0.0), torch.tensor(0.0), 8)
    assert torch.isfinite(fake_quantize(torch.ones(3), scale, zp, 8)).all()


def test_weight_quantizer_is_per_output_channel_and_per_part():
    torch.manual_seed(0)
    weight = torch.randn(6, 8, 3, 3) * torch.arange(1, 7).view(6, 1, 1, 1)  # channel scales differ
    weight[:, 4:] *= 10  # second input part has a much wider range
    parts = torch.tensor([0] * 4 + [1] * 4)
    wq = WeightQuantizer(weight.shape, parts, 2, bits=4)
    wq.init_params(weight, grid=1, p=2.4)  # grid of one ratio = plain min-max
    for c in range(6):
        for j, sl in enumerate((slice(0, 4), slice(4, 8))):
            block = weight[c, sl]
            expected, scale, _ = reference_quantize(block.flatten(), block.min().item(), block.max().item(), 4)
            assert wq.scale[c, j].item() == pytest.approx(scale, rel=1e-5)
            torch.testing.assert_close(wq(weight)[c, sl].flatten(), expected.float(), atol=1e-4, rtol=0)
    ints = wq.to_integer(weight)
    assert torch.equal(ints, ints.round()) and ints.min() >= 0 and ints.max() <= 15


def test_mse_search_never_worse_than_minmax():
    torch.manual_seed(1)
    weight = torch.randn(16, 32)
    weight[:, 0] = 8.0  # one outlier column makes clipping worthwhile
    parts = torch.zeros(32, dtype=torch.long)
    err = {}
    for grid in (1, 80):
        scale, zp = search_weight_params(weight, parts, 1, 4, grid, 2.4)
        w_hat = fake_quantize(weight, scale[:, :1], zp[:, :1], 4)
        err[grid] = (weight - w_hat).abs().pow(2.4).sum(1)
    assert (err[80] <= err[1] + 1e-6).all() and (err[80] < err[1]).any()


def test_act_quantizer_keeps_one_parameter_set_per_step():
    aq = ActQuantizer(num_channels=4, parts=torch.zeros(4, dtype=torch.long), num_parts=1, bits=8, num_steps=3)
    aq.calibrating = True
    for step, amplitude in enumerate((1.0, 10.0, 100.0)):
        aq.step = step
        aq(torch.linspace(-amplitude, amplitude, 64).view(1, 4, 4, 4), channel_dim=1)
    aq.calibrating = False
    expected = torch.tensor([2.0, 20.0, 200.0]) / 255
    torch.testing.assert_close(aq.scale[:, 0], expected)
    aq.step = 0
    out = aq(torch.full((1, 4, 1, 1), 50.0), channel_dim=1)
    assert out.max().item() == pytest.approx(1.0, abs=expected[0].item())  # clipped by step 0's range


def test_act_quantizer_ema_over_batches():
    aq = ActQuantizer(1, torch.zeros(1, dtype=torch.long), 1, 8, 1)
    aq.calibrating, aq.momentum = True, 0.95
    aq(torch.tensor([[-1.0, 1.0]]).view(1, 1, 2), channel_dim=1)
    aq(torch.tensor([[-3.0, 5.0]]).view(1, 1, 2), channel_dim=1)
    assert aq.running_min[0, 0].item() == pytest.approx(0.95 * -1 + 0.05 * -3)
    assert aq.running_max[0, 0].item() == pytest.approx(0.95 * 1 + 0.05 * 5)


def test_pts_exponent_divides_the_step_by_powers_of_two():
    aq = ActQuantizer(3, torch.zeros(3, dtype=torch.long), 1, 8, 1)
    aq.scale[0, 0], aq.zero_point[0, 0] = 0.1, 128
    aq.exponent[0] = torch.tensor([0, 1, 3], dtype=torch.int8)
    scale, zp = aq.channel_params(0)
    torch.testing.assert_close(scale, torch.tensor([0.1, 0.05, 0.0125]))
    assert torch.equal(zp, torch.full((3,), 128.0))
