"""The submit stage writes a submission only when the competition would accept it."""

from pathlib import Path

import pandas as pd
import pytest
from click.testing import CliRunner

from pricefuse.cli import main
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
