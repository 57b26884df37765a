import pytest
import torch

from pipeline.method.pts import select_pts_layers, vote
from pipeline.quant.quantizers import affine_params


def planted(k_true, samples=64, positions=50, mixed=False, seed=0):
    """Channel c spans about ``Δ·2^-k_c·levels``: its best step is Δ·2^-k_c. ``mixed``: about 40 % of
    the samples span a 4x wider range instead (they want k_c - 2), so the samples disagree."""
    bits, delta = 8, 0.02
    levels = 2**bits - 1
    gen = torch.Generator().manual_seed(seed)
    half = delta * levels / 2 * 2.0 ** -k_true.float() * 0.9  # stay inside the shrunken range
    x = (torch.rand(samples, len(k_true), positions, generator=gen) * 2 - 1) * half[None, :, None]
    if mixed:
        x = x * torch.where(torch.rand(samples, len(k_true), 1, generator=gen) < 0.4, 4.0, 1.0)
    scale, zp = affine_params(torch.tensor(-delta * levels / 2), torch.tensor(delta * levels / 2), bits)
    c = len(k_true)
    return x, scale.expand(c), zp.expand(c), bits


def test_vote_recovers_planted_exponents():
    k_true = torch.tensor([0, 1, 2, 3, 0, 2, 1, 3])
    x, scale, zp, bits = planted(k_true)
    result = vote(x, scale, zp, bits, num_candidates=4, threshold=0.85, channel_dim=1)
    assert torch.equal(result["k"], k_true)
    assert (result["agreement"] == 1).all()


def test_disagreeing_samples_fall_back_to_zero():
    k_true = torch.tensor([3, 3, 2, 2])
    x, scale, zp, bits = planted(k_true, mixed=True, seed=3)
    result = vote(x, scale, zp, bits, num_candidates=4, threshold=0.85, channel_dim=1)
    assert (result["agreement"] < 0.85).all()
    assert (result["k"] == 0).all() and (result["k_mode"] > 0).all()
    loose = vote(x, scale, zp, bits, num_candidates=4, threshold=0.1, channel_dim=1)
    assert torch.equal(loose["k"], loose["k_mode"])


def test_ties_go_to_the_finest_step():
    """A dead channel (all zeros: every candidate's error is 0) votes for the largest k, as the reference does;
    so does a channel whose samples split evenly between two exponents."""
    x, scale, zp, bits = planted(torch.tensor([1, 1]), samples=8)
    x[:, 0] = 0
    x[4:, 1] = x[:4, 1] * 0  # half the samples dead: they vote 3, the other half 1
    result = vote(x, scale, zp, bits, num_candidates=4, threshold=0.5, channel_dim=1)
    assert result["k_mode"].tolist() == [3, 3] and result["agreement"].tolist() == [1.0, 0.5]


def test_vote_handles_channel_last_inputs():
    k_true = torch.tensor([2, 0, 1])
    x, scale, zp, bits = planted(k_true)
    result = vote(x.transpose(1, 2), scale, zp, bits, 4, 0.85, channel_dim=-1)
    assert torch.equal(result["k"], k_true)


def test_pattern_that_matches_nothing_is_an_error():
    names = ["up_blocks.0.resnets.0.conv_shortcut", "mid_block.resnets.0.conv1"]
    assert select_pts_layers(names, ["*conv_shortcut"]) == names[:1]
    with pytest.raises(ValueError, match="pts.layers"):
        select_pts_layers(names, ["*shortcut_conv"])
