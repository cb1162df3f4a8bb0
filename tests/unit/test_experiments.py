"""pricefuse.recording.experiments: overrides -> `dvc exp run -S`, dvc.yaml graph, parsing DVC's
output."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import yaml

from pricefuse.core.config import ConfigError, load_raw
from pricefuse.recording import experiments as ex
from pricefuse.recording.tracking import JOIN_STAGE_ENV, PARENT_RUN_ENV, route_mlflow_run

ROOT = Path(__file__).resolve().parents[2]
DVC_YAML = yaml.safe_load((ROOT / "dvc.yaml").read_text())
RAW = load_raw(ROOT / "params.yaml")

# What `dvc exp run -S fusion.lr=0.001 train_fusion` printed (dvc 3.67), trimmed.
EXP_RUN_OUTPUT = """\
Reproducing experiment 'sixty-huck'
Stage 'preprocess' didn't change, skipping
Stage 'train_linear' is cached - skipping run, checking out outputs
Running stage 'train_fusion':
> pricefuse train-fusion
fusion OOF SMAPE 60.311% (folds 61.14, 61.41, 58.38) in 0s
Updating lock file 'dvc.lock'

Ran experiment(s): sixty-huck
Experiment results have been applied to your workspace.
"""
STATUS_JSON = (
    '{"ensemble": [{"changed deps": {"data/models/fusion": "modified"}}], "ablation": '
    '[{"changed deps": {"data/models/fusion": "modified", "params.yaml": {"fusion": "modified"}}}]}'
)


def _exp_show(name: str = "sixty-huck") -> str:
    """The shape of `dvc exp show --json`: workspace first, then baselines with experiments."""

    def data(rev: str, lr: float, alpha: float) -> dict:
        params = {"fusion": {"lr": lr, "epochs": 6}, "ensemble": {"stack_alpha": alpha}}
        return {"rev": rev, "params": {"params.yaml": {"data": params}}, "metrics": {}}

    return json.dumps(
        [
            {"rev": "workspace", "name": None, "data": data("workspace", 0.001, 2.0),
             "error": None, "experiments": None},
            {
                "rev": "b3b69acb7087",
                "name": "master",
                "data": data("b3b69acb7087", 0.002, 1.0),
                "error": None,
                "experiments": [
                    {"executor": None, "name": "other",
                     "revs": [{"rev": "aaaa", "name": "other", "data": data("aaaa", 0.5, 1.0)}]},
                    {"executor": None, "name": name,
                     "revs": [{"rev": "11fc6bd8", "name": name,
                               "data": data("11fc6bd8", 0.001, 2.0),
                               "error": None, "experiments": None}]},
                ],
            },
        ]
    )  # fmt: skip


def test_empty_overrides_are_dropped():
    assert ex.effective_overrides(
        ["fusion.lr=", "fusion.epochs=3", "fusion.heads.gated_residual.hidden= "]
    ) == [("fusion.epochs", 3)]


def test_set_args_carry_the_validated_typed_values():
    args = ex.validate(
        [
            "fusion.lr=1e-3",  # a string to YAML, the float 0.001 after validation
            "fusion.epochs=1e1",
            "fusion.heads.gated_residual.dropout=",
            "ablation.fusion_variants=[text, all]",
            "embed.text_model=pkg:it's a\\",
            "ensemble.register=false",
        ],
        ROOT / "params.yaml",
    )
    assert args == [
        "-S", "fusion.lr=0.001",
        "-S", "fusion.epochs=10",
        "-S", "ablation.fusion_variants=['text','all']",
        "-S", "embed.text_model='pkg:it\\'s a\\\\'",
        "-S", "ensemble.register=false",
    ]  # fmt: skip


@pytest.mark.parametrize(
    "override, message",
    [
        ("fusion.lrr=1", "fusion.lrr"),
        ("fusion.epochs=many", "fusion.epochs"),
        ("fusion={lr: 1}", "missing parameter.*fusion.epochs"),
        ("fusion.lr", "key=value"),
    ],
)
def test_bad_overrides_fail_before_anything_runs(override: str, message: str):
    with pytest.raises(ConfigError, match=message):
        ex.validate([override], ROOT / "params.yaml")


@pytest.mark.parametrize(
    "value",
    [0.001, 1e-5, 1e16, 3, True, None, "plain", "it's", "a\\", "a\\'b", "x: y", "[1]", "1e-3",
     ("text", "all"), (2, 5)],
)  # fmt: skip
def test_hydra_reads_back_the_rendered_value(value):
    parser = pytest.importorskip("hydra.core.override_parser.overrides_parser")
    parsed = parser.OverridesParser.create().parse_overrides([f"k={ex.hydra_value(value)}"])
    got = parsed[0].value()
    assert got == (list(value) if isinstance(value, tuple) else value)
    assert type(got) is (list if isinstance(value, tuple) else type(value))


def test_stage_outputs_resolve_params_variables():
    assert ex.stage_outputs(DVC_YAML, RAW, "train_fusion") == [
        "data/models/fusion",
        "plots/train_fusion",
    ]
    assert ex.stage_outputs(DVC_YAML, RAW, "neighbours") == [
        "data/neighbours",
        "data/models/neighbours",
        "plots/neighbours",
    ]
    assert ex.stage_outputs(DVC_YAML, RAW, "ablation") == ["plots/ablation"]


def test_downstream_stages_follow_outputs_to_deps():
    assert ex.downstream_stages(DVC_YAML, RAW, ["train_fusion"]) == [
        "ensemble",
        "ablation",
        "submit",
    ]
    assert ex.downstream_stages(DVC_YAML, RAW, ["ensemble"]) == ["submit"]
    assert ex.downstream_stages(DVC_YAML, RAW, ["submit"]) == []
    assert "train_fusion" in ex.downstream_stages(DVC_YAML, RAW, ["train_linear"])


def test_dvc_exp_run_output_is_parsed():
    assert ex.experiment_name(EXP_RUN_OUTPUT) == "sixty-huck"
    assert ex.experiment_name("ERROR: failed") is None
    assert ex.stage_outcomes(EXP_RUN_OUTPUT) == {
        "preprocess": "unchanged",
        "train_linear": "cached",
        "train_fusion": "ran",
    }
    failed = "Running stage 'x':\nerror: x: bad loss\nERROR: failed to reproduce 'x'\n"
    assert ex.error_lines(failed) == ["error: x: bad loss", "ERROR: failed to reproduce 'x'"]


def test_dvc_status_json_is_parsed():
    assert ex.stale_stages(STATUS_JSON) == ["ensemble", "ablation"]
    assert ex.stale_stages("{}") == []
    assert ex.stale_stages('{"sub/dvc.yaml:train": []}') == ["train"]


def test_experiment_is_found_in_exp_show_json():
    found = ex.find_experiment(_exp_show(), "sixty-huck")
    assert found is not None
    assert (found.rev, found.baseline_name, found.baseline_rev) == (
        "11fc6bd8",
        "master",
        "b3b69acb7087",
    )
    assert found.params["fusion"]["lr"] == 0.001
    assert ex.changed_params(found.baseline_params, found.params) == {
        "ensemble.stack_alpha": (1.0, 2.0),
        "fusion.lr": (0.002, 0.001),
    }
    assert ex.find_experiment(_exp_show(), "missing") is None
    assert ex.find_experiment("[]", "sixty-huck") is None


def _outcome(**changes) -> ex.Outcome:
    base = dict(
        stage="train_fusion",
        name="sixty-huck",
        overrides={"fusion.lr": (0.002, 0.001)},
        outputs=["data/models/fusion"],
        output_runs=["run1"],
        this_run="run1",
        stage_outcome="ran",
        stale=["ensemble", "ablation", "submit"],
        downstream=["ensemble", "ablation", "submit"],
        baseline="master@b3b69ac",
    )
    return ex.Outcome(**{**base, **changes})


def test_report_says_what_holds_the_output_and_what_is_stale():
    text = ex.report(_outcome(also_changed={"ensemble.stack_alpha": (1.0, 2.0)}))
    assert "DVC experiment 'sixty-huck'" in text and "fusion.lr 0.002 -> 0.001" in text
    assert "data/models/fusion now holds this run's output (MLflow run run1)" in text
    stale = next(line for line in text.splitlines() if "Stale" in line)
    assert "ensemble" in stale and "NOT use" in stale and "dvc repro" in stale
    assert "ensemble.stack_alpha 1.0 -> 2.0" in text
    assert "dvc exp remove sixty-huck" in text and "dvc exp apply" in text
    two = ex.report(_outcome(outputs=["data/models/fusion", "plots/train_fusion"]))
    assert "data/models/fusion, plots/train_fusion now hold this run's output" in two


def test_report_on_a_run_cache_restore_names_the_earlier_run():
    text = ex.report(_outcome(stage_outcome="cached", output_runs=["old"], this_run="new"))
    assert "NOT retrained" in text and "MLflow run old" in text
    assert "(new) trained nothing" in text


def test_report_when_nothing_downstream_is_stale():
    text = ex.report(_outcome(stale=["train_gbdt"], stage_outcome="unchanged", overrides={}))
    assert "Up to date with it: ensemble, ablation, submit" in text
    assert "Also stale, for other reasons: train_gbdt" in text
    assert "params changed: none" in text


def test_direct_run_warning(tmp_path: Path):
    (tmp_path / "dvc.yaml").write_text((ROOT / "dvc.yaml").read_text())
    (tmp_path / "params.yaml").write_text((ROOT / "params.yaml").read_text())
    kwargs = {"dvc_yaml_path": tmp_path / "dvc.yaml", "params_path": tmp_path / "params.yaml"}
    warning = ex.direct_run_warning("train_fusion", ["fusion.lr=1e-3", "fusion.epochs="], **kwargs)
    assert warning is not None
    assert "data/models/fusion" in warning and "dvc.lock" in warning and "dvc repro" in warning
    assert "pricefuse experiment train_fusion --set fusion.lr=1e-3`" in warning
    assert "dvc exp run -S fusion.lr=0.001 train_fusion" in warning
    assert ex.direct_run_warning("train_fusion", ["fusion.lr="], **kwargs) is None
    assert ex.direct_run_warning("not_a_stage", ["fusion.lr=1"], **kwargs) is None
    assert ex.direct_run_warning("train_fusion", ["fusion.lr=1"], tmp_path / "none.yaml") is None


def test_only_the_requested_stage_joins_the_mlflow_run(monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setenv("MLFLOW_RUN_ID", "abc")
    monkeypatch.setenv(JOIN_STAGE_ENV, "train_fusion")
    monkeypatch.delenv(PARENT_RUN_ENV, raising=False)
    route_mlflow_run("train_fusion")
    assert os.environ["MLFLOW_RUN_ID"] == "abc" and PARENT_RUN_ENV not in os.environ
    route_mlflow_run("train_linear")  # a stale upstream stage `dvc exp run` re-runs first
    assert "MLFLOW_RUN_ID" not in os.environ
    assert os.environ[PARENT_RUN_ENV] == "abc"


def test_shell_quote_prefers_double_quotes_around_hydra_strings():
    assert ex.shell_quote("fusion.lr=0.001") == "fusion.lr=0.001"
    assert ex.shell_quote("fusion.loss='smape'") == "\"fusion.loss='smape'\""
    assert ex.shell_quote("a='$HOME'") == "'a='\"'\"'$HOME'\"'\"''"
