import pytest
import yaml

from pipeline.config import ConfigError, load_config, parse_config


def default():
    with open("params.yaml") as f:
        return yaml.safe_load(f)


def test_default_params_load():
    cfg = load_config("params.yaml")
    assert cfg.diffusion.steps == 20 and cfg.quant.method in {"minmax", "dmq"}


@pytest.mark.parametrize(
    "section, key, value, expected",
    [
        ("quant", "w_bits", 0, "quant.w_bits"),
        ("quant", "a_bits", 17, "quant.a_bits"),
        ("quant", "method", "awq", "quant.method"),
        ("pts", "ratio_threshold", 0.0, "pts.ratio_threshold"),
        ("pts", "ratio_threshold", 1.5, "pts.ratio_threshold"),
        ("les", "iters", 0, "les.iters"),
        ("sample", "num_sampels", 10, "sample.num_sampels"),
        ("model", "source", "hub", "model.source"),
    ],
)
def test_bad_value_names_the_key(section, key, value, expected):
    data = default()
    data[section][key] = value
    with pytest.raises(ConfigError, match=expected.replace(".", r"\.")):
        parse_config(data)


def test_unknown_method_lists_allowed_names():
    data = default()
    data["quant"]["method"] = "awq"
    with pytest.raises(ConfigError, match="allowed: minmax, qdiff, dmq"):
        parse_config(data)


def test_local_model_needs_a_path():
    data = default()
    data["model"]["source"] = "local"
    with pytest.raises(ConfigError, match="model.path"):
        parse_config(data)


def test_missing_file(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "nope.yaml")
