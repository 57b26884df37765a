import importlib
import re

import pytest
import yaml

from helpers import ROOT
from pipeline.config import ConfigError, load_config, parse_config


def default():
    return yaml.safe_load((ROOT / "params.yaml").read_text())


def test_default_params_load():
    cfg = load_config(ROOT / "params.yaml")
    assert cfg.diffusion.steps == 20 and cfg.quant.method in {"minmax", "dmq"}


@pytest.mark.parametrize(
    "section, key, value, expected",
    [
        ("quant", "w_bits", 0, "quant.w_bits: .* (got 0); allowed: [2, 16]"),
        ("quant", "w_bits", 1, "quant.w_bits: .* (got 1); allowed: [2, 16]"),
        ("quant", "a_bits", 17, "quant.a_bits: .* (got 17); allowed: [2, 16]"),
        ("quant", "method", "awq", "quant.method: unknown method 'awq'; allowed: minmax, qdiff, dmq"),
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
    data[section][key] = value
    with pytest.raises(ConfigError, match=re.escape(expected).replace(r"\.\*", ".*")):
        parse_config(data)


def test_unknown_method_lists_allowed_names():
    data = default()
    data["quant"]["method"] = "awq"
    with pytest.raises(ConfigError, match="allowed: minmax, qdiff, dmq"):
        parse_config(data)


def test_local_model_needs_a_path():
    data = default()
    data["model"]["source"] = "local"
    with pytest.raises(ConfigError, match=r"model\.path: required when model\.source is 'local'"):
        parse_config(data)


@pytest.mark.parametrize(
    "section, values, expected",
    [
        ("model", {"source": "local", "path": "no/such/folder"}, r"model\.path: no/such/folder does not exist"),
        ("model", {"source": "local", "path": "{tmp}"}, r"model\.path: .* has neither unet/ \(pipeline layout\) nor config\.json \(bare UNet\)"),
        ("pts", {"layers": ["*shortcut_conv"]}, r"pts\.layers: pattern '\*shortcut_conv' matches no quantized layer; .* end in .*conv_shortcut"),
    ],
)
def test_model_dependent_checks_fail_at_load(tmp_path, section, values, expected):
    (tmp_path / "scheduler").mkdir()  # a folder with a scheduler but no UNet
    values = {k: v.format(tmp=tmp_path) if isinstance(v, str) else v for k, v in values.items()}
    data = default()
    data["quant"]["method"] = "dmq"  # a method that uses PTS, so pts.layers matters
    data[section].update(values)
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(data))
    parse_config(data)  # the values on their own are fine: only the model shows the problem
    with pytest.raises(ConfigError, match=expected):
        load_config(tmp_path / "params.yaml")


def test_pts_patterns_matter_only_for_methods_with_pts(tmp_path):
    data = default()
    data["quant"]["method"] = "qdiff"
    data["pts"]["layers"] = ["*shortcut_conv"]
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(data))
    assert load_config(tmp_path / "params.yaml").pts.layers == ["*shortcut_conv"]


@pytest.mark.parametrize("stage", ["fp_model", "classifier", "dump", "stats", "les", "recon", "pts", "sample", "fid"])
def test_every_stage_fails_on_bad_params_before_writing_anything(stage, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    data = default()
    data["quant"]["w_bits"] = 1
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(data))
    main = importlib.import_module(f"stages.{stage}").main
    with pytest.raises(ConfigError, match=r"quant\.w_bits"):
        main()
    assert [p.name for p in tmp_path.iterdir()] == ["params.yaml"]


def test_missing_file(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "nope.yaml")
