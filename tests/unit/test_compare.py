"""pricefuse.recording.compare and `pricefuse compare`: runs logged into a real (temp SQLite) MLflow
store."""

from __future__ import annotations

import math
from pathlib import Path

import mlflow
import pandas as pd
import pytest
from click.testing import CliRunner
from mlflow.entities import Metric, Param
from PIL import Image

from pricefuse.cli import main
from pricefuse.recording.compare import CompareError, compare_runs, load_runs, write_outputs
from tests.support import PARAMS_YAML

EXPERIMENT = "arch-cmp"
FOLDS_A = {"data_md5": "aaaa1111"}
FOLDS_B = {"data_md5": "bbbb2222"}  # other raw data: other folds


class Store:
    """A temp SQLite store shared by the module's tests (creating one costs seconds)."""

    def __init__(self, uri: str) -> None:
        self.uri = uri
        self.client = mlflow.MlflowClient(uri)
        self.clock = 1_700_000_000_000
        self.ids: dict[str, str] = {}

    def run(
        self,
        name: str,
        experiment: str = EXPERIMENT,
        stage: str = "train_fusion",
        tags: dict | None = None,
        params: dict | None = None,
        metrics: dict | None = None,
        status: str = "FINISHED",
    ) -> str:
        """Log one run the way tracking.stage_run does (tag `stage`, dotted params)."""
        found = self.client.get_experiment_by_name(experiment)
        exp_id = found.experiment_id if found else self.client.create_experiment(experiment)
        self.clock += 60_000  # later runs start later: the newest decides the default folds
        run = self.client.create_run(
            exp_id, start_time=self.clock, tags={"stage": stage, **(tags or {})}, run_name=stage
        )
        base = {"seed": 42, "preprocess.n_folds": 5, "preprocess.min_price": 0.01}
        self.client.log_batch(
            run.info.run_id,
            params=[Param(k, str(v)) for k, v in {**base, **(params or {})}.items()],
            metrics=[Metric(k, float(v), self.clock, 0) for k, v in (metrics or {}).items()],
        )
        self.client.set_terminated(run.info.run_id, status)
        self.ids[name] = run.info.run_id
        return run.info.run_id


def _fusion(arch: str | None, loss: str, smape: float, folds=(), seconds: float = 10.0) -> dict:
    params = {"fusion.loss": loss, "fusion.lr": 0.002}
    if arch is not None:
        params["fusion.arch"] = arch
    metrics = {"smape_oof": smape, "train_seconds": seconds}
    metrics.update({f"smape_fold_{k}": v for k, v in enumerate(folds)})
    return {"params": params, "metrics": metrics}


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory) -> Store:
    path = tmp_path_factory.mktemp("compare") / "mlflow.db"
    s = Store(f"sqlite:///{path}")
    # Older runs on other data first: the newest run (fold set A) picks the default folds.
    s.run("b_dcn", tags=FOLDS_B, **_fusion("dcn", "huber_smape", 30.0, (29, 31)))
    s.run("old", tags=FOLDS_A, **_fusion(None, "huber_smape", 55.0))  # before fusion.arch
    s.run("gated_1", tags=FOLDS_A, **_fusion("gated_residual", "huber_smape", 50.0, (49, 51, 50)))
    s.run("gated_2", tags=FOLDS_A, **_fusion("gated_residual", "huber_smape", 52.0))
    s.run("dcn_huber", tags=FOLDS_A, **_fusion("dcn", "huber_smape", 48.0, (47, 49)))
    s.run("dcn_smape_1", tags=FOLDS_A, **_fusion("dcn", "smape", 49.0, seconds=20))
    s.run("dcn_smape_2", tags=FOLDS_A, **_fusion("dcn", "smape", 47.5, (46, 48, 48.5), 30))
    # Not part of the comparison: another stage, a failed run, a run without the metric.
    s.run("gbdt", stage="train_gbdt", tags=FOLDS_A, **_fusion("dcn", "smape", 1.0))
    s.run("failed", tags=FOLDS_A, status="FAILED", **_fusion("dcn", "smape", 2.0))
    s.run("no_metric", tags=FOLDS_A, params={"fusion.arch": "towers", "fusion.loss": "mse"})
    s.run("prep", experiment="only-preprocess", stage="preprocess", tags=FOLDS_A)
    return s


@pytest.fixture(scope="module")
def runs(store: Store) -> pd.DataFrame:
    return load_runs(EXPERIMENT, "train_fusion", store.uri)


def test_groups_sorted_best_first_with_stats_on_the_newest_folds(store, runs):
    result = compare_runs(runs)
    table = result.table
    assert list(zip(table["fusion.arch"], table["fusion.loss"], strict=True)) == [
        ("dcn", "smape"),
        ("dcn", "huber_smape"),
        ("gated_residual", "huber_smape"),
        ("(unset)", "huber_smape"),  # logged before the param existed
    ]
    dcn_smape = table.iloc[0]
    assert dcn_smape["runs"] == 2
    assert dcn_smape["smape_oof_best"] == 47.5
    assert dcn_smape["smape_oof_mean"] == pytest.approx(48.25)
    assert dcn_smape["smape_oof_std"] == pytest.approx(math.sqrt(2 * 0.75**2))
    assert dcn_smape["fold_mean"] == pytest.approx(47.5)  # the best run's folds
    assert dcn_smape["fold_std"] == pytest.approx(pd.Series([46, 48, 48.5]).std())
    assert dcn_smape["fold_count"] == 3
    assert dcn_smape["train_seconds"] == pytest.approx(25.0)
    assert dcn_smape["best_run_id"] == store.ids["dcn_smape_2"]
    single = table.iloc[1]
    assert math.isnan(single["smape_oof_std"]) and single["fold_count"] == 2
    assert table.iloc[3]["fold_count"] == 0 and math.isnan(table.iloc[3]["fold_mean"])
    assert len(set(table["fold_set"])) == 1
    assert (result.left_out_other_folds, result.left_out_no_metric) == (1, 1)
    text = result.to_text()
    assert "data_md5 aaaa1111, preprocess.n_folds 5, seed 42 (6 runs)" in text
    assert "1 run on other folds" in text and "1 run without smape_oof" in text
    assert "47.500±1.323 (3)" in text


def test_rank_by_mean_orders_by_the_mean_over_runs(runs):
    table = compare_runs(runs, rank="mean").table
    # dcn/smape has the best run (47.5) but a mean of 48.25 over its two runs; dcn/huber 48.0.
    assert list(table["fusion.loss"][:2]) == ["huber_smape", "smape"]
    assert list(table["fusion.arch"][:3]) == ["dcn", "dcn", "gated_residual"]
    with pytest.raises(CompareError, match="rank must be one of best, mean"):
        compare_runs(runs, rank="median")


def test_all_runs_keeps_other_folds_in_their_own_block(runs):
    result = compare_runs(runs, all_runs=True)
    table = result.table
    assert len(table) == 5
    # 30.0 beats every fold-set-A score but is on other data: last, in its own block.
    assert table.iloc[-1]["smape_oof_best"] == 30.0
    assert table["fold_set"].iloc[-1] != table["fold_set"].iloc[0]
    assert list(result.fold_sets["data_md5"]) == ["aaaa1111", "bbbb2222"]
    assert result.left_out_other_folds == 0
    assert "Only rows of the same fold set are comparable." in result.to_text()


def test_other_seed_or_preprocess_params_are_other_folds(store):
    store.run("seed7", experiment="seeds", tags=FOLDS_A, params={"seed": 7, "fusion.arch": "dcn"},
              metrics={"smape_oof": 40.0})  # fmt: skip
    store.run("seed42", experiment="seeds", tags=FOLDS_A, params={"fusion.arch": "dcn"},
              metrics={"smape_oof": 45.0})  # fmt: skip
    result = compare_runs(load_runs("seeds", "train_fusion", store.uri), by=["fusion.arch"])
    assert list(result.table["smape_oof_best"]) == [45.0]  # the newest run's folds only
    assert result.left_out_other_folds == 1


def test_a_known_param_no_run_logged_groups_as_unset(runs):
    by = ["params.fusion.head", "fusion.head"]  # a prefix and a repeat change nothing
    result = compare_runs(runs, by=by, known_params=["fusion.head"])
    assert list(result.table["fusion.head"]) == ["(unset)"]
    assert result.table.iloc[0]["runs"] == 6


def test_writes_the_csv_and_a_sane_png(runs, tmp_path: Path):
    result = compare_runs(runs, all_runs=True)
    csv_path, png_path = write_outputs(result, tmp_path / "out")
    written = pd.read_csv(csv_path)
    assert list(written.columns) == list(result.table.columns)
    assert list(written["smape_oof_best"]) == list(result.table["smape_oof_best"])
    with Image.open(png_path) as image:
        image.verify()
    with Image.open(png_path) as image:
        width, height = image.size
    assert 500 <= width <= 2000 and 200 <= height <= 2000


@pytest.mark.parametrize(
    ("call", "expected"),
    [
        (
            lambda s: load_runs("nope", "train_fusion", s.uri),
            ["'nope'", "arch-cmp", "only-preprocess"],
        ),
        (
            lambda s: load_runs("only-preprocess", "train_fusion", s.uri),
            ["no FINISHED runs of stage 'train_fusion'", "preprocess (1)"],
        ),
        (
            lambda s: compare_runs(load_runs(EXPERIMENT, "train_fusion", s.uri), by=["fusion.arc"]),
            [
                "unknown --by param 'fusion.arc'",
                "Did you mean fusion.arch",
                # fusion.lr differs too: the run without a metric did not log it
                "differ between the runs: fusion.arch, fusion.loss, fusion.lr\n",
                "fusion.* params the runs have: fusion.arch, fusion.loss, fusion.lr",
            ],
        ),
        (
            lambda s: compare_runs(load_runs(EXPERIMENT, "train_fusion", s.uri), metric="rmse"),
            ["metric 'rmse'", "smape_oof, train_seconds"],
        ),
    ],
    ids=["no-experiment", "no-stage-runs", "unknown-by", "no-metric"],
)
def test_errors_say_what_there_is(store, call, expected):
    with pytest.raises(CompareError) as err:
        call(store)
    for text in expected:
        assert text in str(err.value)


def test_cli_prints_the_table_and_writes_both_files(store, tmp_path, monkeypatch):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", store.uri)
    runner = CliRunner()
    args = ["compare", "--params", str(PARAMS_YAML), "--out", str(tmp_path)]
    ok = runner.invoke(main, [*args, "--experiment", EXPERIMENT, "--stage", "train-fusion"])
    assert ok.exit_code == 0, ok.output
    first_row = ok.output.split("best_run_id", 1)[1].splitlines()[1].split()
    assert first_row[:3] == ["dcn", "smape", "2"]
    assert (tmp_path / "compare.csv").is_file() and (tmp_path / "compare.png").is_file()
    bad = runner.invoke(main, [*args, "--experiment", "nope"])
    assert bad.exit_code == 1 and "no MLflow experiment named 'nope'" in bad.output
