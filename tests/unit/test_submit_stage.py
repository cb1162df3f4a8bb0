"""The submit stage writes a submission only when the competition would accept it."""

import sys
from pathlib import Path

import pandas as pd
import pytest
from click.testing import CliRunner

from pricefuse.cli import main
from pricefuse.core.errors import StageError
from pricefuse.core.layout import Layout
from pricefuse.pipeline.submission import SubmissionRejected, read_test_rows, submit
from tests.support import PARAMS_YAML, project_params

PARAMS = project_params()


@pytest.fixture
def project(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.chdir(tmp_path)
    (tmp_path / "params.yaml").write_text(PARAMS_YAML.read_text())
    test_csv = tmp_path / PARAMS.data.test_csv
    test_csv.parent.mkdir(parents=True)
    pd.DataFrame({"sample_id": [11, 12, 13], "catalog_content": ["a", "b", "c"]}).to_csv(
        test_csv, index=False
    )
    (tmp_path / "data/models/ensemble").mkdir(parents=True)
    return tmp_path


def _predictions(project: Path, ids: list[int], prices: list[float]) -> None:
    frame = pd.DataFrame({"sample_id": ids, "ensemble": [0.0] * len(ids), "price": prices})
    frame.to_parquet(project / "data/models/ensemble/test.parquet", index=False)


def test_valid_predictions_are_written_in_test_order(project: Path):
    _predictions(project, [13, 11, 12], [3.0, 1.0, 2.0])
    result = CliRunner().invoke(main, ["submit"])
    assert result.exit_code == 0, result.output
    written = pd.read_csv(project / PARAMS.data.submission_csv)
    assert list(written.columns) == ["sample_id", "price"]
    assert written["sample_id"].tolist() == [11, 12, 13]
    assert written["price"].tolist() == [1.0, 2.0, 3.0]


@pytest.mark.parametrize(
    ("ids", "prices", "problem"),
    [
        ([11, 12], [1.0, 2.0], "missing"),
        ([11, 12, 13, 13], [1.0, 2.0, 3.0, 3.0], "duplicated"),
        ([11, 12, 13], [1.0, 0.0, 2.0], "not positive and finite"),
        ([11, 12, 99], [1.0, 2.0, 3.0], "not in the test set"),
    ],
)
def test_bad_predictions_exit_nonzero_and_write_nothing(project: Path, ids, prices, problem):
    _predictions(project, ids, prices)
    result = CliRunner().invoke(main, ["submit"])
    assert result.exit_code == 1
    assert problem in result.output
    assert not (project / PARAMS.data.submission_csv).exists()


def test_a_rejection_is_recorded_before_failing(project: Path):
    import mlflow

    _predictions(project, [11, 12], [1.0, 2.0])
    assert CliRunner().invoke(main, ["submit"]).exit_code == 1
    (run,) = mlflow.search_runs(experiment_names=[PARAMS.mlflow.experiment], output_format="list")
    assert run.info.status == "FAILED"
    assert run.data.tags["submission_valid"] == "false"
    assert run.data.metrics == {"rows": 2.0, "problems": 1.0}
    text = mlflow.artifacts.load_text(f"runs:/{run.info.run_id}/validation.txt")
    assert "1 test sample_id(s) missing" in text


@pytest.fixture
def no_mlflow(monkeypatch: pytest.MonkeyPatch) -> None:
    """`import mlflow` fails: what runs under this fixture provably never touches tracking."""
    monkeypatch.setitem(sys.modules, "mlflow", None)


def test_core_returns_the_record_without_mlflow(project: Path, no_mlflow: None):
    _predictions(project, [13, 11, 12], [3.0, 1.0, 2.0])
    layout = Layout(PARAMS.data)
    result = submit("test_predictions", layout, read_test_rows(PARAMS.data.test_csv))
    assert result.metrics == {"rows": 3.0, "problems": 0.0}
    assert result.tags == {"submission_valid": "true"}
    assert result.texts == {"validation.txt": "valid: 3 rows"}
    assert result.artifacts == {"submission": [layout.submission]}
    assert pd.read_csv(layout.submission)["sample_id"].tolist() == [11, 12, 13]


def test_core_rejection_carries_the_record_and_writes_nothing(project: Path, no_mlflow: None):
    _predictions(project, [11, 12, 12], [1.0, -2.0, 2.0])
    layout = Layout(PARAMS.data)
    with pytest.raises(SubmissionRejected, match="nothing written") as rejected:
        submit("test_predictions", layout, read_test_rows(PARAMS.data.test_csv))
    record = rejected.value.record
    assert record.tags == {"submission_valid": "false"}
    assert record.metrics["problems"] == len(rejected.value.problems) == 3
    assert "duplicated" in record.texts["validation.txt"]
    assert not record.artifacts and not layout.submission.exists()
    with pytest.raises(StageError, match=r"submit\.source must be one of"):
        submit("nowhere", layout, read_test_rows(PARAMS.data.test_csv))
