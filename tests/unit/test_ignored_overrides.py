"""Overrides the configuration ignores (pricefuse.core.config.READ_ONLY_WHEN): the rules, their
messages, and the refusal of `pricefuse experiment` before DVC runs anything."""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner

from pricefuse.cli import main
from pricefuse.core.config import (
    READ_ONLY_WHEN,
    ConfigError,
    apply_overrides,
    flatten,
    ignored_overrides,
    load_raw,
    params_from_dict,
)
from pricefuse.recording import experiments as ex
from tests.support import PARAMS_YAML, REPO_ROOT

RAW = load_raw(PARAMS_YAML)
DEFAULT_MEMBERS = "[fusion,lightgbm,xgboost,catboost,lightgbm_unit,lightgbm_own,linear,knn]"
WITH_TEXT = "[fusion,lightgbm,xgboost,catboost,lightgbm_unit,lightgbm_own,linear,knn,text]"


def ignored(*overrides: str, flags: dict[str, str] | None = None) -> list[str]:
    """The messages for `overrides` merged into the repository's params.yaml."""
    params = params_from_dict(apply_overrides(RAW, overrides))
    keys = [text.split("=", 1)[0] for text in overrides]
    return ignored_overrides(params, keys, flags)


def test_the_defaults_assumed_here() -> None:
    """The cases below start from these params.yaml values."""
    params = params_from_dict(RAW)
    assert params.fusion.arch == "dcn" and params.fusion.loss == "huber_smape"
    assert "text" not in params.ensemble.members and params.text.kind == "encoder"
    assert params.gbdt.objective == "huber" and "ridge" in params.ensemble.stackers
    assert params.text.smape_epochs < params.text.epochs
    assert f"[{','.join(params.ensemble.members)}]" == DEFAULT_MEMBERS


def test_a_knob_of_another_head_is_refused_naming_the_head_and_the_fix() -> None:
    assert ignored("fusion.heads.gated_residual.hidden=512") == [
        "fusion.heads.gated_residual.hidden=512 would change nothing: only the gated_residual "
        "head reads it and fusion.arch is dcn (pass --set fusion.arch=gated_residual too)"
    ]
    assert ignored("fusion.heads.towers.widths=[8,4]") == [
        "fusion.heads.towers.widths=[8,4] would change nothing: only the towers head reads it "
        "and fusion.arch is dcn (pass --set fusion.arch=towers too)"
    ]
    assert ignored("fusion.heads.dcn.cross_layers=2") == []


def test_overrides_are_judged_together() -> None:
    """The condition may come in the same command, before or after the key it enables."""
    assert ignored("fusion.heads.gated_residual.hidden=512", "fusion.arch=gated_residual") == []
    assert ignored("fusion.arch=gated_residual", "fusion.heads.gated_residual.dropout=0.3") == []
    assert len(ignored("fusion.arch=gated_residual", "fusion.heads.dcn.proj_dim=8")) == 1


@pytest.mark.parametrize(
    ("overrides", "refused"),
    [
        (["fusion.huber_delta=0.5"], False),  # huber_smape
        (["fusion.huber_delta=0.5", "fusion.loss=smape"], True),
        (["fusion.huber_delta=0.5", "fusion.loss=mse>smape"], True),
        (["fusion.huber_delta=0.5", "fusion.loss=huber>smape"], False),
        (["fusion.smooth_l1_beta=0.5"], True),
        (["fusion.smooth_l1_beta=0.5", "fusion.loss=smooth_l1>smape"], False),
        (["fusion.loss_switch=0.5"], True),
        (["fusion.loss_switch=0.5", "fusion.loss=huber>smape"], False),
        (["fusion.loss=smooth_l1", "fusion.lr=0.01", "fusion.epochs=3"], False),  # unconditional
    ],
)
def test_loss_parameters_count_only_under_a_loss_that_reads_them(
    overrides: list[str], refused: bool
) -> None:
    assert bool(ignored(*overrides)) is refused


def test_loss_messages() -> None:
    assert ignored("fusion.smooth_l1_beta=0.5") == [
        "fusion.smooth_l1_beta=0.5 would change nothing: only the smooth_l1 loss reads it and "
        "fusion.loss is huber_smape (pass --set fusion.loss=smooth_l1 too)"
    ]
    assert ignored("fusion.loss_switch=0.5") == [
        "fusion.loss_switch=0.5 would change nothing: only a two-phase loss schedule "
        "(first>second) reads it and fusion.loss is huber_smape (pass --set "
        "'fusion.loss=huber>smape' too)"
    ]
    assert ignored("fusion.huber_delta=0.5", "fusion.loss=smape")[0] == (
        "fusion.huber_delta=0.5 would change nothing: only the huber and huber_smape losses read "
        "it and fusion.loss is smape (pass --set fusion.loss=huber_smape too)"
    )


def test_text_keys_need_the_text_member_and_lora_keys_the_decoder() -> None:
    assert ignored("text.epochs=1") == [
        "text.epochs=1 would change nothing: only the text member reads it and ensemble.members "
        'has no text, so train_text only records "disabled" (pass --set '
        f"'ensemble.members={WITH_TEXT}' too)"
    ]
    assert ignored("text.epochs=1", f"ensemble.members={WITH_TEXT}") == []
    # both conditions unmet: both named, both fixes asked for
    assert ignored("text.lora.r=8") == [
        "text.lora.r=8 would change nothing: only the text member reads it and ensemble.members "
        'has no text, so train_text only records "disabled"; only text.kind decoder_lora reads '
        "it and text.kind is encoder (pass --set 'ensemble.members="
        f"{WITH_TEXT}' and --set text.kind=decoder_lora too)"
    ]
    with_text = f"ensemble.members={WITH_TEXT}"
    assert len(ignored("text.lora.r=8", with_text)) == 1
    assert ignored("text.lora.r=8", with_text, "text.kind=decoder_lora") == []


def test_text_huber_delta_needs_a_huber_epoch() -> None:
    with_text = f"ensemble.members={WITH_TEXT}"
    assert ignored("text.huber_delta=2", with_text) == []
    assert ignored("text.huber_delta=2", with_text, "text.smape_epochs=3", "text.epochs=3") == [
        "text.huber_delta=2.0 would change nothing: only the Huber epochs (the first text.epochs "
        "- text.smape_epochs) read it and text.smape_epochs is 3 of text.epochs 3 (pass --set "
        "text.smape_epochs=2 too)"
    ]


def test_booster_and_stacker_knobs_need_their_booster_or_stacker() -> None:
    assert ignored("gbdt.huber_delta=1") == []
    assert ignored("gbdt.huber_delta=1", "gbdt.objective=l2") == [
        "gbdt.huber_delta=1.0 would change nothing: only gbdt.objective huber reads it and "
        "gbdt.objective is l2 (pass --set gbdt.objective=huber too)"
    ]
    assert ignored("gbdt.xgboost.max_depth=4") == []
    assert ignored("gbdt.boosters=[lightgbm]", "gbdt.xgboost.max_depth=4") == [
        "gbdt.xgboost.max_depth=4 would change nothing: only the xgboost booster reads it and "
        "gbdt.boosters is [lightgbm] (pass --set 'gbdt.boosters=[lightgbm,xgboost]' too)"
    ]
    # a booster trained only as a per-unit member (gbdt.unit_price_boosters) reads its section
    only_unit = ("gbdt.boosters=[lightgbm]", "gbdt.unit_price_boosters=[xgboost]")
    assert ignored(*only_unit, "gbdt.xgboost.max_depth=4") == []
    # and one trained only as an own-view member (gbdt.own_view_boosters) reads it too
    only_own = ("gbdt.boosters=[lightgbm]", "gbdt.own_view_boosters=[catboost]")
    assert ignored(*only_own, "gbdt.catboost.depth=4") == []
    assert ignored(*only_own, "gbdt.xgboost.max_depth=4") != []
    assert ignored("ensemble.stack_alpha=3") == []
    assert ignored("ensemble.stackers=[lightgbm]", "ensemble.stack_alpha=3") == [
        "ensemble.stack_alpha=3.0 would change nothing: only the ridge stacker reads it and "
        "ensemble.stackers is [lightgbm] (pass --set 'ensemble.stackers=[lightgbm,ridge]' too)"
    ]


def test_the_fix_is_phrased_as_the_entry_points_parameters() -> None:
    """Under `mlflow run`: -P for a key the entry point sets, params.yaml for one it does not."""
    flags = {"fusion.arch": "arch", "fusion.heads.gated_residual.hidden": "hidden"}
    assert ignored("fusion.heads.gated_residual.hidden=512", flags=flags) == [
        "fusion.heads.gated_residual.hidden=512 would change nothing: only the gated_residual "
        "head reads it and fusion.arch is dcn (pass -P arch=gated_residual too)"
    ]
    assert ignored("fusion.smooth_l1_beta=0.5", flags=flags)[0].endswith(
        "(set fusion.loss: smooth_l1 in params.yaml too)"
    )
    flags["fusion.loss"] = "loss"  # a value the shell would misread is quoted
    assert ignored("fusion.loss_switch=0.5", flags=flags)[0].endswith(
        "(pass -P 'loss=huber>smape' too)"
    )
    with_text = f"ensemble.members={WITH_TEXT}"
    assert ignored("text.lora.r=8", with_text, flags={"text.kind": "kind"}) == [
        "text.lora.r=8 would change nothing: only text.kind decoder_lora reads it and text.kind "
        "is encoder (pass -P kind=decoder_lora too)"
    ]


def test_every_rule_names_keys_of_the_schema() -> None:
    """A pattern left behind by a renamed key would silently stop guarding anything."""
    keys = flatten(params_from_dict(RAW))
    for pattern, _condition in READ_ONLY_WHEN:
        if pattern.endswith(".*"):
            assert any(key.startswith(pattern[:-1]) for key in keys), pattern
        else:
            assert pattern in keys, pattern


def test_validate_refuses_an_ignored_override_and_takes_it_with_its_condition() -> None:
    with pytest.raises(ConfigError, match=r"hidden=512 would change nothing.*fusion\.arch is dcn"):
        ex.validate(["fusion.heads.gated_residual.hidden=512"], PARAMS_YAML)
    args = ex.validate(
        ["fusion.arch=gated_residual", "fusion.heads.gated_residual.hidden=512", "fusion.lr="],
        PARAMS_YAML,
    )
    assert args == [
        "-S", "fusion.arch='gated_residual'",
        "-S", "fusion.heads.gated_residual.hidden=512",
    ]  # fmt: skip


def test_mlproject_sets_map_keys_to_parameters() -> None:
    flags = ex.entry_point_flags("train_fusion", REPO_ROOT / "MLproject")
    assert flags["fusion.heads.gated_residual.hidden"] == "hidden"
    assert flags["fusion.arch"] == "arch"
    assert ex.entry_point_flags("main", REPO_ROOT / "MLproject") == {}
    assert ex.entry_point_flags("train_fusion", REPO_ROOT / "nope") == {}


@pytest.fixture
def project(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> list[list[str]]:
    """A project root with the real dvc.yaml, params.yaml and MLproject, where `dvc exp run`
    is recorded instead of run (and fails, so nothing after it runs)."""
    for name in ("dvc.yaml", "params.yaml", "MLproject"):
        shutil.copy(REPO_ROOT / name, tmp_path / name)
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv(ex.MLFLOW_RUN_ENV, raising=False)
    calls: list[list[str]] = []

    def tee(cmd: Any, env: Any) -> tuple[int, str]:
        calls.append(list(cmd))
        return 3, "ERROR: not run in this test\n"

    monkeypatch.setattr(ex, "_tee", tee)
    return calls


def test_pricefuse_experiment_refuses_before_dvc_runs(
    project: list[list[str]], monkeypatch: pytest.MonkeyPatch
) -> None:
    before = Path("params.yaml").read_text()
    runner = CliRunner()
    args = ["experiment", "train_fusion", "--set", "fusion.heads.gated_residual.hidden=512"]
    result = runner.invoke(main, args)
    assert result.exit_code == 2, result.output  # click's usage error
    assert "--set fusion.arch=gated_residual too" in result.output
    # As MLproject runs it: the fix in -P terms.
    monkeypatch.setenv(ex.MLFLOW_RUN_ENV, "0123abcd")
    result = runner.invoke(main, args)
    assert result.exit_code == 2
    assert (
        "fusion.heads.gated_residual.hidden=512 would change nothing: only the gated_residual "
        "head reads it and fusion.arch is dcn (pass -P arch=gated_residual too)"
    ) in result.output
    assert project == [] and Path("params.yaml").read_text() == before
    # With the head chosen too, it goes on to `dvc exp run` (stubbed: fails with exit 3).
    both = [*args, "--set", "fusion.arch=gated_residual", "--set", "fusion.lr="]
    result = runner.invoke(main, both)
    assert result.exit_code == 3
    assert project == [
        [
            "dvc", "exp", "run",
            "-S", "fusion.heads.gated_residual.hidden=512",
            "-S", "fusion.arch='gated_residual'",
            "train_fusion",
        ]
    ]  # fmt: skip
