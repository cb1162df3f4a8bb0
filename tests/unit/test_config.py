import dataclasses
import typing
from pathlib import Path

import pytest
import yaml

from pricefuse.core import config
from pricefuse.core.config import ConfigError, Params, flatten, load_params, params_from_dict
from tests.support import PARAMS_YAML, project_params


def _schema_classes(cls: type = Params) -> list[type]:
    """Params and every section class reachable from it (nested sections included)."""
    found = [cls]
    for annotation in typing.get_type_hints(cls).values():
        if dataclasses.is_dataclass(annotation):
            found.extend(_schema_classes(annotation))
    return found


def _copy_params(tmp_path: Path, edit: typing.Callable[[dict], None]) -> Path:
    """A copy of the real params.yaml with `edit` applied to its tree."""
    tree = yaml.safe_load(PARAMS_YAML.read_text())
    edit(tree)
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump(tree, sort_keys=False))
    return path


def test_params_yaml_matches_schema():
    params = load_params(PARAMS_YAML)
    assert isinstance(params, Params)
    assert params == params_from_dict(yaml.safe_load(PARAMS_YAML.read_text()))
    assert params == project_params()


def test_no_schema_field_has_a_default():
    """params.yaml is the only place a value lives: a default here would be a second copy."""
    with_default = [
        f"{cls.__name__}.{f.name}"
        for cls in _schema_classes()
        for f in dataclasses.fields(cls)
        if f.default is not dataclasses.MISSING or f.default_factory is not dataclasses.MISSING
    ]
    assert with_default == []
    # every section class of the module is part of the schema (or the base of one, whose fields
    # a section inherits: `ServingLimits`), so the check above saw every field
    module_classes = {
        obj
        for obj in vars(config).values()
        if dataclasses.is_dataclass(obj) and obj.__module__ == config.__name__
    }
    schema = set(_schema_classes())
    bases = {base for cls in schema for base in cls.__mro__[1:] if dataclasses.is_dataclass(base)}
    assert module_classes == schema | bases


def test_missing_keys_fail_naming_every_dotted_key(tmp_path: Path):
    def drop(tree: dict) -> None:
        del tree["fusion"]["lr"]
        del tree["gbdt"]["lightgbm"]["num_leaves"]
        del tree["submit"]

    path = _copy_params(tmp_path, drop)
    with pytest.raises(ConfigError) as failure:
        load_params(path)
    message = str(failure.value)
    assert "missing parameter(s) fusion.lr, gbdt.lightgbm.num_leaves, submit" in message
    assert str(path) in message


def test_a_changed_value_in_the_file_is_the_value_loaded(tmp_path: Path):
    def change(tree: dict) -> None:
        tree["fusion"]["lr"] = 0.0123
        tree["gbdt"]["lightgbm"]["num_leaves"] = 7
        tree["neighbours"]["spaces"] = ["image"]

    params = load_params(_copy_params(tmp_path, change))
    assert params.fusion.lr == pytest.approx(0.0123)
    assert params.gbdt.lightgbm.num_leaves == 7
    assert params.neighbours.spaces == ("image",)
    assert dataclasses.replace(
        params,
        fusion=project_params().fusion,
        gbdt=project_params().gbdt,
        neighbours=project_params().neighbours,
    ) == load_params(PARAMS_YAML)


def test_project_params_merges_sections_and_validates():
    params = project_params(seed=5, gbdt={"lightgbm": {"num_leaves": 7}})
    assert params.seed == 5
    assert params.gbdt.lightgbm.num_leaves == 7
    assert params.gbdt.lightgbm.subsample == load_params(PARAMS_YAML).gbdt.lightgbm.subsample
    with pytest.raises(ConfigError, match="unknown parameter"):
        project_params(gbdt={"lightgbm": {"leaves": 7}})


def test_dotted_override_is_typed_and_local():
    before = PARAMS_YAML.read_text()
    params = load_params(PARAMS_YAML, ["fusion.lr=1e-3", "gbdt.boosters=[lightgbm]"])
    assert params.fusion.lr == pytest.approx(0.001)
    assert params.gbdt.boosters == ("lightgbm",)
    assert PARAMS_YAML.read_text() == before


def test_empty_override_means_as_in_params():
    params = load_params(PARAMS_YAML, ["fusion.lr=", "fusion.epochs="])
    assert params.fusion == load_params(PARAMS_YAML).fusion


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("fusion.lrr=1", "unknown parameter"),
        ("fusion.epochs=1.5", "integer"),
        ("fusion.lr=fast", "number"),
        ("neighbours.as_features=3", "true/false"),
        ("fusion", "key=value"),
        ("gbdt.lightgbm={}", r"missing parameter\(s\) gbdt\.lightgbm\.num_leaves"),
    ],
)
def test_bad_overrides_fail_loudly(override, message):
    with pytest.raises(ConfigError, match=message):
        load_params(PARAMS_YAML, [override])


def test_flatten_uses_dotted_keys():
    params = project_params(gbdt={"lightgbm": {"num_leaves": 17}})
    flat = flatten(params)
    assert flat["fusion.lr"] == params.fusion.lr
    assert flat["gbdt.lightgbm.num_leaves"] == 17
    assert flat["ensemble.members"] == ",".join(params.ensemble.members)
    assert flat["neighbours.spaces"] == ",".join(params.neighbours.spaces)
