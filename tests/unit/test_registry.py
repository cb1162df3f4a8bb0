"""The promotion gate on a real (temporary, sqlite) MLflow registry.

Versions are registered straight from runs that logged an OOF table (no model needs logging for
the out-of-fold gate); the live `--rows` comparison logs two tiny pyfuncs. One store serves the
module (creating a sqlite store takes seconds); each test registers its own model name.
"""

from __future__ import annotations

from pathlib import Path

import mlflow
import numpy as np
import pandas as pd
import pytest
from click.testing import CliRunner

from pricefuse.cli import main
from pricefuse.recording import registry, tracking
from pricefuse.recording.registry import Comparison, decide
from tests.support import PARAMS_YAML

EXPERIMENT = "registry-tests"
ALIAS = "champion"


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("registry")


@pytest.fixture
def model(store: Path, monkeypatch: pytest.MonkeyPatch, request: pytest.FixtureRequest) -> str:
    """A fresh registered-model name in the module's store (experiment artifacts under it)."""
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{store / 'mlflow.db'}")
    tracking.configure(EXPERIMENT, root=store)
    return f"price-{request.node.name}".replace("[", "-").replace("]", "")


def _oof(rows: int, error: float, seed: int = 0, ids: range | None = None) -> pd.DataFrame:
    """An OOF table whose predictions miss every price by `error` (relative), alternating sign
    (rows even): SMAPE = `_smape(error)` exactly, whatever the prices."""
    rng = np.random.default_rng(seed)
    price = np.round(np.exp(rng.normal(2.5, 1.0, rows)), 2)
    sign = np.where(np.arange(rows) % 2 == 0, 1.0, -1.0)
    ids = ids if ids is not None else range(rows)
    return pd.DataFrame(
        {"sample_id": list(ids), "price": price, "prediction": price * (1 + sign * error)}
    )


def _smape(error: float) -> float:
    """Mean of 200e/(2+e) and 200e/(2-e)."""
    return 400 * error / (4 - error**2)


def _register(model: str, table: pd.DataFrame) -> str:
    """A new version whose run logged `table` as its OOF predictions, as the ensemble stage does."""
    client = mlflow.MlflowClient()
    if not client.search_registered_models(f"name='{model}'"):
        client.create_registered_model(model)
    with mlflow.start_run(run_name="ensemble") as run:
        registry.log_oof_table(table, run.info.run_id)
    version = client.create_model_version(model, f"runs:/{run.info.run_id}/m", run.info.run_id)
    return str(version.version)


def _gate(model: str, version: str, tolerance: float = 0.0, force: bool = False):
    scorer = registry.oof_scorer(model)
    return registry.promote_version(model, ALIAS, version, scorer, tolerance, force)


def _version_record(model: str, version: str) -> tuple[dict[str, str], str]:
    found = mlflow.MlflowClient().get_model_version(model, version)
    return found.tags, found.description


def test_first_version_becomes_champion(model: str):
    assert registry.served_model_uri(model, ALIAS)[0] == f"models:/{model}/latest"
    first = _register(model, _oof(120, 0.2))
    decision = _gate(model, first)
    assert decision.outcome == "first champion"
    assert registry.champion_version(model, ALIAS) == first
    assert decision.comparison.smape_candidate == pytest.approx(_smape(0.2))
    tags, description = _version_record(model, first)
    assert tags["promotion.outcome"] == "first champion" and tags["promotion.rows"] == "120"
    assert "first @champion" in description
    assert registry.served_model_uri(model, ALIAS) == (f"models:/{model}@{ALIAS}", None)


def test_worse_version_is_recorded_and_not_promoted_better_one_is(model: str):
    champion = _register(model, _oof(120, 0.2))
    _gate(model, champion)
    worse = _register(model, _oof(120, 0.3))
    decision = _gate(model, worse)
    assert decision.outcome == "kept" and not decision.moves_alias
    assert registry.champion_version(model, ALIAS) == champion
    assert decision.champion_before == decision.champion_after == champion
    assert decision.comparison.rows == 120
    assert decision.comparison.smape_champion == pytest.approx(_smape(0.2))
    assert decision.comparison.smape_candidate == pytest.approx(_smape(0.3))
    tags, description = _version_record(model, worse)
    assert tags["promotion.outcome"] == "kept"
    assert tags["promotion.champion_after"] == champion
    assert f"stays v{champion}" in description and "on the same 120 rows" in description

    better = _register(model, _oof(120, 0.1))
    decision = _gate(model, better)
    assert decision.outcome == "promoted"
    assert registry.champion_version(model, ALIAS) == better
    assert decision.metrics()["promotion/smape_champion"] == pytest.approx(_smape(0.2))


def test_slightly_worse_within_tolerance_is_promoted(model: str):
    champion = _register(model, _oof(100, 0.20))
    _gate(model, champion)
    close = _register(model, _oof(100, 0.21))  # about 1.02 SMAPE points worse
    assert _gate(model, close, tolerance=1.1).outcome == "promoted"
    assert registry.champion_version(model, ALIAS) == close


def test_versions_on_other_rows_are_not_comparable(model: str):
    champion = _register(model, _oof(100, 0.2))
    _gate(model, champion)
    # the same ids priced differently (another data set) and a few shared rows only
    other = _oof(100, 0.1, seed=1, ids=range(60, 160))
    decision = _gate(model, _register(model, other))
    assert decision.outcome == "not comparable"
    assert "only 0 of the candidate's 100 OOF rows" in decision.reason
    assert registry.champion_version(model, ALIAS) == champion
    assert decision.metrics() == {}


def test_force_moves_the_alias_and_says_so(model: str):
    champion = _register(model, _oof(100, 0.2))
    _gate(model, champion)
    worse = _register(model, _oof(100, 0.5))
    runner = CliRunner()
    args = [
        "promote",
        "--params",
        str(PARAMS_YAML),
        "--set",
        f"mlflow.registered_model={model}",
        "--set",
        f"mlflow.experiment={EXPERIMENT}",
    ]
    refused = runner.invoke(main, args)  # --version defaults to the newest
    assert refused.exit_code == 0, refused.output
    assert f"version {worse} not promoted: @champion stays v{champion}" in refused.output
    forced = runner.invoke(main, [*args, "--version", worse, "--force"])
    assert forced.exit_code == 0, forced.output
    assert f"version {worse} FORCED to @champion (was v{champion})" in forced.output
    assert registry.champion_version(model, ALIAS) == worse
    assert _version_record(model, worse)[0]["promotion.outcome"] == "forced"
    unknown = runner.invoke(main, [*args, "--version", "99"])
    assert unknown.exit_code != 0 and "no version 99" in unknown.output


class _ScaledText(mlflow.pyfunc.PythonModel):
    """A stand-in served model: the price written in catalog_content, times `factor`."""

    def __init__(self, factor: float) -> None:
        self.factor = factor

    def predict(self, context, model_input: pd.DataFrame, params=None) -> pd.DataFrame:
        value = model_input["catalog_content"].str.extract(r"Value: ([\d.]+)")[0].astype(float)
        return pd.DataFrame({"price": value * self.factor, "sample_id": model_input["sample_id"]})


def test_rows_mode_runs_both_models_live(model: str, tmp_path: Path):
    for factor in (1.5, 1.1):  # version 1 (the champion) misses by 50 %, version 2 by 10 %
        with mlflow.start_run():
            mlflow.pyfunc.log_model(
                name="m",
                python_model=_ScaledText(factor),
                pip_requirements=["mlflow"],
                registered_model_name=model,
            )
    mlflow.MlflowClient().set_registered_model_alias(model, ALIAS, "1")
    prices = [2.0, 5.5, 12.0, 40.0]
    rows = tmp_path / "holdout.csv"
    pd.DataFrame(
        {
            "sample_id": range(4),
            "catalog_content": [f"Item Name: x\nValue: {p}\nUnit: Count" for p in prices],
            "image_link": "",
            "price": prices,
        }
    ).to_csv(rows, index=False)
    params = tracking_params(model)
    decision = registry.promote_command(params, "2", rows, force=False)
    assert decision.outcome == "promoted", decision.describe()
    assert decision.comparison.basis == "rows:holdout.csv"
    assert decision.comparison.smape_candidate == pytest.approx(200 * 0.1 / 2.1)
    assert decision.comparison.smape_champion == pytest.approx(200 * 0.5 / 2.5)
    assert registry.champion_version(model, ALIAS) == "2"


def tracking_params(model: str):
    from tests.support import project_params

    return project_params(mlflow={"registered_model": model, "experiment": EXPERIMENT})


@pytest.mark.parametrize(
    ("candidate", "champion", "tolerance", "force", "outcome"),
    [
        (10.0, 10.0, 0.0, False, "promoted"),  # not worse: equal is enough
        (10.5, 10.0, 0.5, False, "promoted"),  # worse by exactly the tolerance
        (10.51, 10.0, 0.5, False, "kept"),
        (10.51, 10.0, 0.5, True, "forced"),
        (9.0, 10.0, 0.0, False, "promoted"),
    ],
)
def test_rule(candidate: float, champion: float, tolerance: float, force: bool, outcome: str):
    comparison = Comparison(50, candidate, champion, "oof")
    assert decide("m", ALIAS, "2", "1", comparison, tolerance, force).outcome == outcome


def test_not_comparable_unless_forced_and_no_champion_means_first():
    assert decide("m", ALIAS, "2", "1", "no table", 0.0, False).outcome == "not comparable"
    forced = decide("m", ALIAS, "2", "1", "no table", 0.0, True)
    assert forced.outcome == "forced" and forced.champion_after == "2"
    first = decide("m", ALIAS, "1", None, Comparison(5, 3.0, None, "oof"), 0.0, False)
    assert first.outcome == "first champion" and first.champion_after == "1"


def test_autolog_flavor_modules_are_imported_before_evaluate_takes_its_lock() -> None:
    """The gate imports, outside MLflow's import-hook lock, every `mlflow.<flavor>` module that
    evaluate's hooks would import under it (libraries already loaded), and no other: a fresh
    process with sklearn loaded and transformers not."""
    import subprocess
    import sys

    code = (
        "import sys, sklearn\n"
        "from pricefuse.recording.registry import import_autolog_flavors\n"
        "flavors = import_autolog_flavors()\n"
        "assert 'sklearn' in flavors and 'mlflow.sklearn' in sys.modules, flavors\n"
        "assert 'transformers' not in flavors and 'mlflow.transformers' not in sys.modules\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)
