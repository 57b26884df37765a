import pytest
import torch
import torch.nn as nn
import zarr

import pipeline.method.les
from helpers import Killed, dies_on_the_second_call
from pipeline.infra.checkpoint import Checkpoints
from pipeline.method.les import learn_all, learn_gamma
from pipeline.method.weighting import make_weighting
from pipeline.quant.layers import QuantLayer

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


def test_non_finite_loss_names_layer_and_iteration():
    layer, x, y = outlier_linear()
    x[0, 0, 0] = float("inf")
    with pytest.raises(FloatingPointError, match="LES on my.layer: .* iteration"):
        learn_gamma(
            layer, x, y, S, make_weighting("uniform", S), iters=5, lr=1e-3, batch_size=S * M, seed=0, name="my.layer"
        )


@pytest.fixture
def three_layers(tmp_path):
    """Three layers (one conv with split input channels) and a calib.zarr with their FP I/O."""
    torch.manual_seed(0)
    modules = {"down.conv": nn.Conv2d(8, 8, 3, padding=1), "attn.to_q": nn.Linear(8, 8), "up.conv1": nn.Conv2d(8, 4, 1)}
    inputs = {
        "down.conv": torch.randn(S * M, 8, 4, 4),
        "attn.to_q": torch.randn(S * M, 6, 8),
        "up.conv1": torch.randn(S * M, 8, 4, 4),
    }
    root = zarr.open_group(str(tmp_path / "calib.zarr"), mode="w")
    root.attrs.update({"steps": S, "layer_records_per_step": M})
    for name, module in modules.items():
        with torch.no_grad():
            y = module(inputs[name])
        root.create_array(f"layers/{name}/input", data=inputs[name].half().numpy())
        root.create_array(f"layers/{name}/output", data=y.half().numpy())
    splits = {"up.conv1": 5}  # one split layer: two parts of input channels
    layers = {name: QuantLayer(m, 4, 8, 1, splits.get(name)) for name, m in modules.items()}
    return layers, tmp_path / "calib.zarr"


LEARN = dict(weighting="focal", iters=10, lr=1e-2, batch_size=8, r=20.0, momentum=0.95, seed=3)


def test_workers_do_not_change_gamma(three_layers):
    layers, store = three_layers
    g1, l1 = learn_all(layers, store, workers=1, **LEARN)
    g2, l2 = learn_all(layers, store, workers=2, **LEARN)
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
    uninterrupted = learn_all(layers, store, workers=workers, **LEARN)
    real_job, learned = pipeline.method.les._learn_from_store, []

    with monkeypatch.context() as patch:
        patch.setattr(pipeline.method.les, "_learn_from_store", dies_on_the_second_call(real_job, learned))
        with pytest.raises(Killed):
            learn_all(layers, store, workers=1, checkpoints=Checkpoints(tmp_path / "ckpt", "key"), **LEARN)
    assert Checkpoints(tmp_path / "ckpt", "key").done() == learned
    first = (tmp_path / "ckpt/key" / f"{learned[0]}.safetensors").stat()

    resumed = learn_all(layers, store, workers=workers, checkpoints=Checkpoints(tmp_path / "ckpt", "key"), **LEARN)
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
    gammas, _ = learn_all(layers, store, checkpoints=Checkpoints(tmp_path / "ckpt", "new-params"), **LEARN)
    assert not torch.equal(gammas["down.conv"], torch.full((8,), 7.0))
    assert [p.name for p in (tmp_path / "ckpt").iterdir()] == ["new-params"]


def test_a_damaged_checkpoint_is_redone(three_layers, tmp_path):
    layers, store = three_layers
    expected, _ = learn_all(layers, store, checkpoints=Checkpoints(tmp_path / "ckpt", "key"), **LEARN)
    (tmp_path / "ckpt/key/attn.to_q.safetensors").write_bytes(b"garbage")
    gammas, _ = learn_all(layers, store, checkpoints=Checkpoints(tmp_path / "ckpt", "key"), **LEARN)
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
