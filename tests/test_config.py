import importlib
import re

import pytest
import yaml

from helpers import ROOT
from pipeline.config import ConfigError, parse_config
from pipeline.params import load_config
from pipeline.preflight import notices


def default():
    return yaml.safe_load((ROOT / "params.yaml").read_text())


def test_default_params_load():
    cfg = load_config(ROOT / "params.yaml")
    assert cfg.diffusion.steps == 20 and cfg.row_variant("dmq-w4a6") == ("dmq", 4, 6)
    assert cfg.row_variant("qdiff-w4a6") == ("qdiff", 4, 6) and cfg.weights_variant("qdiff-w4") == ("qdiff", 4, None)


def test_les_without_a_learning_rate_spreads_the_papers_sum_of_learning_rates_over_its_iterations():
    assert load_config(ROOT / "params.yaml").les.learning_rate == 0.02  # the shipped 300 iterations
    assert parse_config({"les": {"iters": 6000}}).les.learning_rate == 0.001  # the paper's schedule
    assert parse_config({"les": {"iters": 1000}}).les.learning_rate == pytest.approx(0.006)
    assert parse_config({"les": {"iters": 1000, "lr": 1e-3}}).les.learning_rate == 1e-3  # a given lr is kept


def test_adaround_without_a_learning_rate_keeps_the_sum_of_3200_iterations_at_the_papers_lr():
    assert load_config(ROOT / "params.yaml").recon.learning_rate == 0.004  # the shipped 800 iterations
    assert parse_config({"recon": {"iters": 400}}).recon.learning_rate == 0.008
    assert parse_config({"recon": {"iters": 3200}}).recon.learning_rate == 0.001
    assert parse_config({"recon": {"iters": 20000}}).recon.learning_rate == 0.001  # never below the paper's
    assert parse_config({"recon": {"iters": 400, "lr": 1e-3}}).recon.learning_rate == 1e-3  # a given lr is kept


def test_rows_whose_weights_match_share_one_chain():
    cfg = load_config(ROOT / "params.yaml")
    assert cfg.rows["dmq-no-pts-w4a6"].weights == "dmq-w4a6" and cfg.rows["dmq-no-les-w4a6"].weights == "qdiff-w4"
    assert cfg.row_variant("dmq-no-pts-w4a6") == ("dmq-no-pts", 4, 6)
    assert {cfg.rows[f"qdiff-steps-w4a{a}"].weights for a in (8, 6, 4)} == {"qdiff-w4"}  # per-step ranges: acts only
    assert len({cfg.weights_signature(name) for name in cfg.weights}) == len(cfg.weights) == 5


def test_timestep_weighted_reconstruction_separates_the_no_les_weights_from_qdiff():
    data = default()
    data["recon"]["weighting"] = "method"  # dmq-no-les reconstructs focal-weighted, qdiff uniform: other weights
    with pytest.raises(ConfigError, match=r"rows\.dmq-no-les-w4a6\.method: dmq-no-les's weights differ"):
        parse_config(data)
    data["weights"]["dmq-no-les-w4"] = {"method": "dmq-no-les", "w_bits": 4}
    for a_bits in (8, 6, 4):
        data["rows"][f"dmq-no-les-w4a{a_bits}"] = {"weights": "dmq-no-les-w4", "a_bits": a_bits}
    assert parse_config(data).row_variant("dmq-no-les-w4a6") == ("dmq-no-les", 4, 6)


@pytest.mark.parametrize(
    "section, key, value, expected",
    [
        ("weights.qdiff-w4", "w_bits", 0, "weights.qdiff-w4.w_bits: .* (got 0); allowed: [2, 16]"),
        ("weights.qdiff-w4", "w_bits", 1, "weights.qdiff-w4.w_bits: .* (got 1); allowed: [2, 16]"),
        ("rows.dmq-w4a8", "a_bits", 17, "rows.dmq-w4a8.a_bits: .* (got 17); allowed: [2, 16]"),
        (
            "weights.qdiff-w4",
            "method",
            "awq",
            "weights.qdiff-w4.method: unknown method 'awq'; allowed: minmax, qdiff, qdiff-steps",
        ),
        ("quant", "weight_clip_grid", 0, "quant.weight_clip_grid: .* (got 0); allowed: [1, inf)"),
        ("pts", "ratio_threshold", 0.0, "pts.ratio_threshold: .* (got 0.0); allowed: (0, 1]"),
        ("pts", "ratio_threshold", 1.5, "pts.ratio_threshold: .* (got 1.5); allowed: (0, 1]"),
        ("les", "iters", 0, "les.iters: .* (got 0); allowed: [1, inf)"),
        ("les", "iters", -100, "les.iters: .* (got -100); allowed: [1, inf)"),
        ("recon", "iters", 0, "recon.iters: .* (got 0); allowed: [1, inf)"),
        ("recon", "weighting", "focal", "recon.weighting: Input should be 'none' or 'method' (got 'focal')"),
        ("sample", "num_sampels", 10, "sample.num_sampels: unknown key"),
        ("model", "source", "hub", "model.source: Input should be 'embedded' or 'local'"),
    ],
)
def test_bad_value_names_the_key_and_the_allowed_values(section, key, value, expected):
    data = default()
    entry = data
    for part in section.split("."):
        entry = entry[part]
    entry[key] = value
    with pytest.raises(ConfigError, match=re.escape(expected).replace(r"\.\*", ".*")):
        parse_config(data)


@pytest.mark.parametrize(
    "change, expected",
    [
        (
            lambda d: d["weights"]["dmq-w4a6"].pop("a_bits"),
            r"weights\.dmq-w4a6: a_bits is required: dmq learns γ against the activation quantizer",
        ),
        (
            lambda d: d["weights"]["qdiff-w4"].update(a_bits=6),
            r"weights\.qdiff-w4: a_bits must be left out: qdiff's weights do not depend on it",
        ),
        (
            lambda d: d["rows"]["dmq-w4a6"].update(a_bits=8),
            r"rows\.dmq-w4a6\.a_bits: 8, but weights\.dmq-w4a6 learned γ for a_bits 6",
        ),
        (
            lambda d: d["rows"]["qdiff-w4a6"].update(weights="qdiff-w3"),
            r"rows\.qdiff-w4a6\.weights: no weights entry 'qdiff-w3'; defined: minmax-w4, ",
        ),
        (
            lambda d: d["weights"].update({"dmq-no-pts-w4a6": {"method": "dmq-no-pts", "w_bits": 4, "a_bits": 6}}),
            r"weights\.dmq-w4a6 and weights\.dmq-no-pts-w4a6 make the same weights .*: keep one",
        ),
        (
            lambda d: d["weights"].update({"no-les-w4": {"method": "dmq-no-les", "w_bits": 4}}),
            r"weights\.qdiff-w4 and weights\.no-les-w4 make the same weights",
        ),
        (
            lambda d: d["rows"]["dmq-no-pts-w4a6"].update(weights="minmax-w4"),
            r"rows\.dmq-no-pts-w4a6\.method: dmq-no-pts's weights differ from those of weights\.minmax-w4 "
            r"\(minmax\); name a weights entry of dmq-no-pts",
        ),
        (
            lambda d: d["rows"]["dmq-no-pts-w4a6"].update(method="awq"),
            r"rows\.dmq-no-pts-w4a6\.method: unknown method 'awq'",
        ),
        (
            lambda d: d["rows"].update({"Big Row": {"weights": "qdiff-w4", "a_bits": 8}}),
            r"rows\.Big Row: use lower-case letters, digits",
        ),
        (
            lambda d: d["rows"].update({"fp": {"weights": "qdiff-w4", "a_bits": 8}}),
            r"rows\.fp: 'fp' names the FP model's samples",
        ),
        (
            lambda d: d["report"]["table"].append("dmq-w2a2"),
            r"report\.table: 'dmq-w2a2' is neither a row, a guard nor a peer",
        ),
        (lambda d: d["quant"].update(seeds=[]), r"quant\.seeds: List should have at least 1 item"),
        (lambda d: d["quant"].update(seeds=[0, 1, 0]), r"quant\.seeds: each quantization seed once"),
        (
            lambda d: d["guard"].update(seed=d["sample"]["seeds"][0]),
            r"guard\.seed: 2024 is one of sample\.seeds; the guard's held-out samples must come from noise",
        ),
        (
            lambda d: d["guards"]["dmq-guard-w4a6"].update(no_les="dmq-no-les-w4a5"),
            r"guards\.dmq-guard-w4a6\.no_les: no row 'dmq-no-les-w4a5'",
        ),
        (
            lambda d: d["guards"]["dmq-guard-w4a6"].update(les="qdiff-w4a6"),
            r"guards\.dmq-guard-w4a6: qdiff-w4a6 must learn γ and dmq-no-les-w4a6 must not",
        ),
        (
            lambda d: d["guards"]["dmq-guard-w4a6"].update(no_les="dmq-no-les-w4a4"),
            r"guards\.dmq-guard-w4a6: dmq-w4a6 is W4A6 but dmq-no-les-w4a4 is W4A4",
        ),
        (
            lambda d: d["guards"].update({"dmq-w4a6": {"les": "dmq-w4a6", "no_les": "dmq-no-les-w4a6"}}),
            r"rows\.dmq-w4a6 and guards\.dmq-w4a6: a name names one row",
        ),
        (lambda d: d["peers"]["quanto-w4a8"].update(a_bits=4), r"peers\.quanto-w4a8\.a_bits: Input should be 8"),
        (
            lambda d: d["calib"].update(layer_records_per_step=1000),
            r"calib\.layer_records_per_step: 1000 is above the 64 records each step has \(calib\.num_samples 64\)",
        ),
        (
            lambda d: d["model"].update(image_size=17),
            r"model\.image_size: 17 is not divisible by 4, the down-sampling of 3 levels",
        ),
        (
            lambda d: d["les"].update(records=1281),
            r"les\.records: 1281 is above the 1280 records of the trajectories \(64 per step x 20 steps\)",
        ),
        (lambda d: d["les"].update(records=19), r"les\.records: 19 is below one record per step \(20 steps\)"),
        (lambda d: d["calib"].update(layer_io_gb=0), r"calib\.layer_io_gb: Input should be greater than 0"),
    ],
    ids=[
        "les-needs-a_bits",
        "no-a_bits-without-les",
        "row-a_bits-against-gamma",
        "unknown-weights",
        "duplicate-chain",
        "duplicate-chain-without-les",
        "row-method-on-other-weights",
        "row-method-unknown",
        "bad-name",
        "fp-is-reserved",
        "unknown-report-row",
        "no-quant-seeds",
        "repeated-quant-seed",
        "guard-without-held-out-noise",
        "guard-unknown-row",
        "guard-les-row-without-les",
        "guard-rows-of-other-bits",
        "guard-named-like-a-row",
        "peer-bits",
        "layer-records-above-the-trajectories",
        "image-size-the-unet-cannot-halve",
        "les-records-above-the-trajectories",
        "les-records-below-one-per-step",
        "layer-io-budget-zero",
    ],
)
def test_matrix_entries_that_do_not_fit_together_are_named(change, expected):
    data = default()
    change(data)
    with pytest.raises(ConfigError, match=expected):
        parse_config(data)


def test_a_local_model_without_inception_weights_guards_on_pixels_and_is_told_so():
    data = default()  # it has guards, criterion features
    data["model"].update(source="local", path="some/folder")
    cfg = parse_config(data)
    assert cfg.guard_criterion() == "pixels"
    assert any("guards compare pixel MSE" in line and "eval.inception_weights" in line for line in notices(cfg))
    data["eval"]["inception_weights"] = "inception.pth"
    assert parse_config(data).guard_criterion() == "features"
    assert parse_config(default()).guard_criterion() == "features"  # the embedded digits: the classifier's


def test_local_model_needs_a_path():
    data = default()
    data["model"]["source"] = "local"
    with pytest.raises(ConfigError, match=r"model\.path: required when model\.source is 'local'"):
        parse_config(data)


@pytest.mark.parametrize(
    "section, values, expected",
    [
        ("model", {"source": "local", "path": "no/such/folder"}, r"model\.path: no/such/folder does not exist"),
        (
            "model",
            {"source": "local", "path": "{tmp}"},
            r"model\.path: .* has neither unet/ \(pipeline layout\) nor config\.json \(bare UNet\)",
        ),
        (
            "pts",
            {"layers": ["*shortcut_conv"]},
            r"pts\.layers: pattern '\*shortcut_conv' matches no quantized layer; .* end in .*conv_shortcut",
        ),
        (
            "calib",
            {"layer_io_gb": 1e-5},
            r"calib\.layer_io_gb: 1e-05 GiB cannot hold one record of layer I/O \(0\.00\d+ GiB in float16\)",
        ),
    ],
)
def test_model_dependent_checks_fail_at_load(tmp_path, section, values, expected):
    (tmp_path / "scheduler").mkdir()  # a folder with a scheduler but no UNet
    values = {k: v.format(tmp=tmp_path) if isinstance(v, str) else v for k, v in values.items()}
    data = default()  # its dmq rows use PTS, so pts.layers matters
    data[section].update(values)
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(data))
    parse_config(data)  # the values on their own are fine: only the model shows the problem
    with pytest.raises(ConfigError, match=expected):
        load_config(tmp_path / "params.yaml")


def test_stages_without_a_model_skip_the_model_checks_but_not_the_file_checks(tmp_path):
    data = default()
    data["pts"]["layers"] = ["*shortcut_conv"]  # matches no layer: only the model shows it
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(data))
    assert load_config(tmp_path / "params.yaml", model_checks=False).pts.layers == ["*shortcut_conv"]
    data["eval"]["inception_weights"] = str(tmp_path / "missing.pth")
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(data))
    with pytest.raises(ConfigError, match=r"eval\.inception_weights: .*missing\.pth not found"):
        load_config(tmp_path / "params.yaml", model_checks=False)


def test_pts_patterns_matter_only_for_methods_with_pts(tmp_path):
    data = default()
    data["weights"] = {"qdiff-w4": {"method": "qdiff", "w_bits": 4}}
    data["rows"] = {"qdiff-w4a8": {"weights": "qdiff-w4", "a_bits": 8}}
    data["guards"] = {}
    data["report"] = {"table": ["qdiff-w4a8"], "ablation": []}
    data["pts"]["layers"] = ["*shortcut_conv"]
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(data))
    assert load_config(tmp_path / "params.yaml").pts.layers == ["*shortcut_conv"]


@pytest.mark.parametrize(
    "stage, entry",
    [
        ("fp_model", None),
        ("classifier", None),
        ("dump", None),
        ("stats", None),
        ("les", "qdiff-w4"),
        ("recon", "qdiff-w4"),
        ("pts", "qdiff-w4a6"),
        ("sample", "qdiff-w4a6"),
        ("sample", "fp"),
        ("eval_files", None),
        ("reference", None),
        ("fid", "qdiff-w4a6"),
        ("peer", "quanto-w4a8"),
        ("report", None),
    ],
)
def test_every_stage_fails_on_bad_params_before_writing_anything(stage, entry, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    data = default()
    data["weights"]["qdiff-w4"]["w_bits"] = 1
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(data))
    main = importlib.import_module(f"stages.{stage}").main
    with pytest.raises(ConfigError, match=r"weights\.qdiff-w4\.w_bits"):
        main(*([entry] if entry else []))
    assert [p.name for p in tmp_path.iterdir()] == ["params.yaml"]


def test_a_stage_names_the_entries_when_given_an_unknown_one(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(default()))
    with pytest.raises(ConfigError, match=r"rows: no entry 'dmq-w3a3'; defined: .*minmax-w4a8"):
        importlib.import_module("stages.pts").main("dmq-w3a3")


def test_missing_file(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "nope.yaml")
