"""Everything that names the stages agrees with `pricefuse.stages.STAGES`, the one list: dvc.yaml,
MLproject's entry points (and the params their `--set` targets), the member registry, the stage
modules and the CLI's subcommands."""

from __future__ import annotations

import json
import re
import shlex
from typing import Any

import pytest
import yaml

from pricefuse.cli import main as cli
from pricefuse.core.config import load_params, load_raw
from pricefuse.pipeline.members import PRODUCERS
from pricefuse.recording.experiments import mlproject_sets, typed_value
from pricefuse.stages import STAGES
from tests.support import PARAMS_YAML, REPO_ROOT

# Entry points that run no single stage: the whole pipeline, and the demo data it starts from.
NOT_STAGES = ("main", "demo_data")
ENTRY_POINTS: dict[str, Any] = yaml.safe_load((REPO_ROOT / "MLproject").read_text())["entry_points"]
STAGE_ENTRY_POINTS = [name for name in ENTRY_POINTS if name not in NOT_STAGES]
_PLACEHOLDER = re.compile(r"\{(\w+)\}")


def test_dvc_yaml_stages_are_the_stages_in_order() -> None:
    dvc_yaml = yaml.safe_load((REPO_ROOT / "dvc.yaml").read_text())
    assert list(dvc_yaml["stages"]) == list(STAGES)


def test_stage_modules_are_the_stages() -> None:
    modules = {path.stem for path in (REPO_ROOT / "src/pricefuse/stages").glob("*.py")} - {
        "__init__"
    }
    assert modules == set(STAGES)


def test_the_cli_has_a_command_per_stage() -> None:
    assert {stage.replace("_", "-") for stage in STAGES} <= set(cli.commands)


def test_the_member_registry_names_only_stages() -> None:
    assert {producer.stage for producer in PRODUCERS} <= set(STAGES)


def test_mlproject_entry_points_are_the_stages() -> None:
    assert set(NOT_STAGES) <= set(ENTRY_POINTS)
    assert sorted(STAGE_ENTRY_POINTS) == sorted(STAGES)


@pytest.mark.parametrize("stage", STAGES)
def test_the_entry_point_runs_its_stage_as_an_experiment(stage: str) -> None:
    words = shlex.split(ENTRY_POINTS[stage]["command"])
    assert words[:3] == ["pricefuse", "experiment", stage]
    # nothing else than `--set KEY={param}` pairs after it
    assert len(words[3:]) == 2 * len(mlproject_sets(ENTRY_POINTS[stage]["command"]))
    assert words[3::2] == ["--set"] * len(words[3::2])


@pytest.mark.parametrize("stage", STAGES)
def test_every_parameter_is_declared_and_used(stage: str) -> None:
    entry = ENTRY_POINTS[stage]
    used = _PLACEHOLDER.findall(entry["command"])
    declared = list(entry.get("parameters") or {})
    assert sorted(used) == sorted(declared), "a {param} undeclared, or a parameter unused"
    assert len(set(used)) == len(used), "a parameter set twice"
    for name, spec in (entry.get("parameters") or {}).items():
        # "" = as in params.yaml (`pricefuse experiment` drops an empty --set)
        assert spec == {"type": "string", "default": ""}, name


def _current(raw: dict[str, Any], key: str) -> Any:
    node: Any = raw
    for part in key.split("."):
        if not isinstance(node, dict) or part not in node:
            return 0  # not in params.yaml: load_params below names the unknown key
        node = node[part]
    return node


@pytest.mark.parametrize("stage", STAGES)
def test_every_set_target_is_one_parameter_of_the_schema(stage: str) -> None:
    """Each KEY of `--set KEY={param}`, set to its params.yaml value, passes the CLI's own
    override parser and schema (an unknown key, or a section, fails)."""
    raw = load_raw(PARAMS_YAML)
    for key in mlproject_sets(ENTRY_POINTS[stage]["command"]):
        override = f"{key}={json.dumps(_current(raw, key))}"
        params = load_params(PARAMS_YAML, [override])
        typed_value(params, key)  # a section would replace a whole mapping: refused
