"""The n-gram member: learns from tokens, never sees its own fold, round-trips without pickle."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
from test_neighbours import rows

from pricefuse.core.metrics import smape_from_log
from pricefuse.models.linear.predictor import LinearPredictor
from pricefuse.models.linear.training import fit_linear
from tests.support import project_params

CFG = replace(project_params().linear, min_df=1, char_max_features=5000, alpha=1.0)


def test_learns_prices_from_tokens() -> None:
    data, y, folds = rows(500)
    fit = fit_linear(CFG, data.parsed, y, folds)
    constant = smape_from_log(y, np.full_like(y, np.median(y)))
    assert fit.smape_oof < 0.5 * constant
    assert sorted(fit.fold_smape) == [0, 1, 2, 3, 4]


def test_oof_prediction_of_a_row_never_depends_on_its_own_fold() -> None:
    data, y, folds = rows(300)
    r = int(np.flatnonzero(folds == 0)[0])
    baseline = fit_linear(CFG, data.parsed, y, folds).oof[r]

    def perturbed(rows_to_change: np.ndarray) -> float:
        parsed = data.parsed.copy()
        parsed.loc[rows_to_change, "item_name"] = data.parsed.loc[r, "item_name"] + " deluxe"
        values = y.copy()
        values[rows_to_change] = 9.0
        return fit_linear(CFG, parsed, values, folds).oof[r]

    assert perturbed(np.setdiff1d(np.flatnonzero(folds == 0), [r])) == baseline
    assert perturbed(np.flatnonzero(folds == 1)) != pytest.approx(baseline, abs=1e-3)


def test_save_load_predicts_the_same_without_pickle(tmp_path: Path) -> None:
    data, y, folds = rows(200)
    query, _, _ = rows(30, seed=2)
    query.parsed.loc[0, "item_name"] = ""  # an empty name still gets a prediction
    model = fit_linear(CFG, data.parsed, y, folds).predictor
    before = model.predict(query.parsed)
    model.save(tmp_path)
    assert {p.suffix for p in tmp_path.iterdir()} <= {".json", ".npy"}
    np.testing.assert_array_equal(LinearPredictor.load(tmp_path).predict(query.parsed), before)
    assert np.isfinite(before).all()
    assert ((before >= y.min()) & (before <= y.max())).all()


AWKWARD_TEXTS = [
    "Acme Green Tea | 20 count | pack 2",
    "",
    "   ",
    "ÜBER café Crème brûlée, 1,000 ml!!",
    "a a a a b b c",  # repeated terms: sublinear tf
    "zzzz qqqq never seen",
    "x" * 3000,
]


@pytest.mark.parametrize("analyzer, ngrams", [("word", (1, 2)), ("char_wb", (2, 5))])
def test_tfidf_rows_equal_the_vectorizers_own_transform(analyzer: str, ngrams) -> None:
    """TfidfRows (the served rows' transform) gives scikit-learn's matrix bit for bit: same
    columns, values, row boundaries and dtype, also for empty and out-of-vocabulary texts."""
    from pricefuse.features.ngrams import TfidfRows, fit_vectorizer, make_vectorizer, text_view

    data, _, _ = rows(300)
    vectorizer = make_vectorizer(analyzer, ngrams, min_df=2)
    fit_vectorizer(vectorizer, text_view(data.parsed, "text"))
    texts = text_view(rows(50, seed=3)[0].parsed, "name") + AWKWARD_TEXTS
    expected, got = vectorizer.transform(texts), TfidfRows(vectorizer).transform(texts)
    assert type(got) is type(expected) and got.dtype == expected.dtype == np.float32
    assert got.has_sorted_indices
    for part in ("indptr", "indices", "data"):
        np.testing.assert_array_equal(getattr(got, part), getattr(expected, part))
    assert TfidfRows(vectorizer).transform([]).shape == (0, len(vectorizer.vocabulary_))


def test_text_view_joins_as_the_pandas_string_operations_did() -> None:
    """The name view, joined per row in Python, equals the pandas formula it replaced on missing,
    non-finite and mistyped values, with object and Arrow string columns."""
    import pandas as pd

    from pricefuse.features.ngrams import text_view

    def pandas_view(parsed: pd.DataFrame) -> list[str]:
        names = parsed["item_name"].fillna("").astype(str)
        value = pd.to_numeric(parsed["value"], errors="coerce")
        value_text = value.map(lambda v: "" if not np.isfinite(v) else f"{v:g}")
        unit = parsed["unit"].fillna("").astype(str)
        pack = pd.to_numeric(parsed["pack"], errors="coerce").fillna(1).astype(int)
        return (names + " | " + value_text + " " + unit + " | pack " + pack.astype(str)).tolist()

    frame = pd.DataFrame(
        {
            "item_name": ["Tea", None, np.nan, "x  y", "Ünïcode"],
            "value": [1.5, np.nan, np.inf, 1e20, "3"],
            "unit": ["oz", None, "", np.nan, "count"],
            "pack": [1, np.nan, 2.7, "4", 1000],
            "text": ["t", None, "nan", np.nan, ""],
        }
    )
    arrow = frame.astype({"item_name": "string", "unit": "string", "text": "string"})
    for parsed in (frame, arrow):
        assert text_view(parsed, "name") == pandas_view(parsed)
        assert text_view(parsed, "text") == parsed["text"].fillna("").astype(str).tolist()
