import numpy as np
import pandas as pd

from pricefuse.pipeline.submission import submission_problems, write_submission


def _frame(ids, prices):
    return pd.DataFrame({"sample_id": ids, "price": prices})


def test_valid_submission_has_no_problems():
    assert submission_problems(_frame([1, 2, 3], [1.0, 2.5, 3.0]), np.array([3, 2, 1])) == []


def test_each_problem_is_named():
    problems = submission_problems(_frame([1, 1, 4], [1.0, -2.0, np.inf]), np.array([1, 2, 3]))
    text = " | ".join(problems)
    assert "duplicated" in text
    assert "missing" in text and "2" in text
    assert "not in the test set" in text
    assert "2 price(s) not positive and finite" in text


def test_wrong_columns():
    problems = submission_problems(pd.DataFrame({"id": [1], "price": [1.0]}), np.array([1]))
    assert problems and "columns" in problems[0]


def test_write_is_atomic_and_exact(tmp_path):
    path = write_submission(_frame([1, 2], [1.5, 2.25]), tmp_path / "sub" / "submission.csv")
    assert path.read_text() == "sample_id,price\n1,1.5\n2,2.25\n"
    assert not list(path.parent.glob("*.tmp"))
