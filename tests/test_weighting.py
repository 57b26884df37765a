import pytest
import torch

from pipeline.method.weighting import make_weighting

ALL_STEPS = torch.arange(4)


def test_uniform_is_one_and_ignores_updates():
    w = make_weighting("uniform", 4)
    w.update(torch.tensor([0, 1]), torch.tensor([5.0, 1.0]))
    assert torch.equal(w.weights(ALL_STEPS), torch.ones(4))


def test_linear_formula():
    w = make_weighting("linear", 10, r=2.0)
    expected = torch.tensor([1 + 2.0 * (1 - s / 10) for s in range(10)])
    torch.testing.assert_close(w.weights(torch.arange(10)), expected)
    assert w.weights(torch.tensor([0])).item() == pytest.approx(3.0)  # first (noisiest) step weighs most


def test_focal_is_uniform_before_first_update():
    assert torch.equal(make_weighting("focal", 4).weights(ALL_STEPS), torch.ones(4))


def test_focal_ema_by_hand():
    m, r = 0.9, 2.0
    w = make_weighting("focal", 4, r=r, momentum=m)
    # batch 1: step 0 gets 1 + 2, step 2 gets 4; every entry decays, then adds (1 - m) * batch sum
    w.update(torch.tensor([0, 0, 2]), torch.tensor([1.0, 2.0, 4.0]))
    ema = [0.1 * 3, 0.0, 0.1 * 4, 0.0]
    expected = [(1 - e / sum(ema)) ** r for e in ema]
    torch.testing.assert_close(w.weights(ALL_STEPS), torch.tensor(expected))
    # batch 2: absent steps 0 and 2 only decay
    w.update(torch.tensor([1, 3]), torch.tensor([1.0, 1.0]))
    ema = [m * 0.3, 0.1 * 1, m * 0.4, 0.1 * 1]
    expected = [(1 - e / sum(ema)) ** r for e in ema]
    torch.testing.assert_close(w.weights(torch.tensor([2, 0, 3, 1])), torch.tensor(expected)[[2, 0, 3, 1]])
    assert w.weights(torch.tensor([2])) < w.weights(torch.tensor([1]))  # larger loss, smaller weight


def test_unknown_kind_names_allowed_kinds():
    with pytest.raises(ValueError, match="uniform, linear, focal"):
        make_weighting("cosine", 4)
