from pathlib import Path

import pytest
import yaml

from pricefuse.config import ConfigError, Params, flatten, load_params, params_from_dict

ROOT = Path(__file__).resolve().parents[2]


def test_params_yaml_matches_schema_and_defaults():
    params = load_params(ROOT / "params.yaml")
    assert isinstance(params, Params)
    # every key in params.yaml is known, and the dataclass defaults mirror the file
    assert params == params_from_dict(yaml.safe_load((ROOT / "params.yaml").read_text()))
    assert params == Params(), "config.py defaults drifted from params.yaml"


def test_dotted_override_is_typed_and_local():
    before = (ROOT / "params.yaml").read_text()
    params = load_params(ROOT / "params.yaml", ["fusion.lr=1e-3", "gbdt.boosters=[lightgbm]"])
    assert params.fusion.lr == pytest.approx(0.001)
    assert params.gbdt.boosters == ("lightgbm",)
    assert (ROOT / "params.yaml").read_text() == before


def test_empty_override_means_as_in_params():
    params = load_params(ROOT / "params.yaml", ["fusion.lr=", "fusion.epochs="])
    assert params.fusion.lr == Params().fusion.lr


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("fusion.lrr=1", "unknown parameter"),
        ("fusion.epochs=1.5", "integer"),
        ("fusion.lr=fast", "number"),
        ("neighbours.as_features=3", "true/false"),
        ("fusion", "key=value"),
    ],
)
def test_bad_overrides_fail_loudly(override, message):
    with pytest.raises(ConfigError, match=message):
        load_params(ROOT / "params.yaml", [override])


def test_flatten_uses_dotted_keys():
    flat = flatten(Params())
    assert flat["fusion.lr"] == Params().fusion.lr
    assert flat["gbdt.lightgbm.num_leaves"] == 31
    assert flat["ensemble.members"] == ",".join(Params().ensemble.members)
    assert flat["neighbours.spaces"].startswith("tfidf_name")
