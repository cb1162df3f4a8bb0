"""TF-IDF n-gram views of the parsed rows, and their persistence without pickle.

Two text views serve the n-gram models: `name` (item name | value unit | pack count) carries the
identity and size of the product in a few words; `text` (item name + bullets + description)
carries everything. Measured on the real rows (5 group folds), TF-IDF + Ridge scores the same on
both views, and the name view is six times cheaper, so it is the default of the linear member.

Why not pickle: a fitted vectorizer is just a vocabulary and an IDF vector. Saving those as JSON
and .npy keeps the model directory readable, diffable and loadable by any scikit-learn version
that takes the same constructor arguments, and loading it cannot run code.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

VIEWS = ("name", "text")


def _strings(column: pd.Series) -> list[str]:
    """`column.fillna("").astype(str)` as a list: missing (None, NaN, pd.NA) -> ""."""
    return ["" if v is None or v is pd.NA or v != v else str(v) for v in column.tolist()]


def _numbers(column: pd.Series) -> np.ndarray:
    """`pd.to_numeric(column, errors="coerce")` as float64 (NaN where missing); a column that
    already holds numbers (what parsing writes) is taken as it is."""
    if isinstance(column.dtype, np.dtype) and column.dtype.kind in "biuf":
        return column.to_numpy().astype(np.float64)  # NumPy numbers: NaN is their only missing
    if not pd.api.types.is_numeric_dtype(column.dtype):
        column = pd.to_numeric(column, errors="coerce")
    return column.to_numpy(dtype=np.float64, na_value=np.nan)


def text_view(parsed: pd.DataFrame, view: str) -> list[str]:
    """The strings one view reads from the parsed table (never NaN).

    The name view is joined per row in Python: pandas' element-wise string concatenation (six
    Arrow string operations) cost more than the rest of the linear member on a served row.
    """
    if view == "name":
        names = _strings(parsed["item_name"])
        value = _numbers(parsed["value"]).tolist()
        units = _strings(parsed["unit"])
        pack = _numbers(parsed["pack"])
        pack = np.where(np.isnan(pack), 1.0, pack).astype(np.int64).tolist()
        return [
            f"{name} | {'' if not np.isfinite(v) else f'{v:g}'} {unit} | pack {count}"
            for name, v, unit, count in zip(names, value, units, pack, strict=True)
        ]
    if view == "text":
        return _strings(parsed["text"])
    raise ValueError(f"unknown text view {view!r}; known: {', '.join(VIEWS)}")


def make_vectorizer(
    analyzer: str, ngram_range: Sequence[int], min_df: int = 1, max_features: int | None = None
) -> Any:
    """A sublinear-tf, l2-normalised TF-IDF vectorizer (words or char_wb n-grams)."""
    from sklearn.feature_extraction.text import TfidfVectorizer

    return TfidfVectorizer(
        analyzer=analyzer,
        ngram_range=(int(ngram_range[0]), int(ngram_range[1])),
        min_df=min_df,
        max_features=max_features or None,
        sublinear_tf=True,
        dtype=np.float32,
    )


def fit_vectorizer(vectorizer: Any, texts: Sequence[str]) -> Any:
    """Fit and return the texts' TF-IDF matrix (one pass over the texts), tolerating a fold whose
    texts yield no term at all (then: a vocabulary of one placeholder term)."""
    try:
        return vectorizer.fit_transform(texts)
    except ValueError:  # "empty vocabulary": every text empty or below min_df
        vectorizer.set_params(min_df=1)
        vectorizer.fit([*texts, "<empty>"])
        return vectorizer.transform(texts)


class TfidfRows:
    """A fitted TfidfVectorizer's `transform`, the same matrix bit for bit, without its per-call
    cost.

    Why: scikit-learn re-validates its parameters, the count matrix and the normalisation input
    on every call, and builds the analyzer anew; for the one short text of a served row that
    cost several times the tokenising itself (the linear member and two neighbour spaces each
    transform every request). Here the analyzer, vocabulary and IDF are taken once, and each
    call runs scikit-learn's own steps in its order: counts per text in first-seen order, a CSR
    matrix of the vectorizer's dtype with sorted indices, `log(tf) + 1` when sublinear, times
    the IDF, rows l2-normalised by scikit-learn's `inplace_csr_row_normalize_l2`
    (tests/unit/test_linear.py compares the two on many texts).
    """

    def __init__(self, vectorizer: Any) -> None:
        if vectorizer.norm not in ("l2", None) or vectorizer.binary:
            raise ValueError("TfidfRows reproduces l2 or no norm, non-binary vectorizers only")
        self.vectorizer = vectorizer
        self._analyze = vectorizer.build_analyzer()
        self._vocabulary = vectorizer.vocabulary_
        self._idf = vectorizer.idf_ if vectorizer.use_idf else None

    def transform(self, texts: Sequence[str]) -> Any:
        """The texts' TF-IDF rows (scipy CSR matrix), as `vectorizer.transform(texts)`."""
        from scipy import sparse
        from sklearn.utils.sparsefuncs_fast import inplace_csr_row_normalize_l2

        vocabulary, analyze = self._vocabulary, self._analyze
        columns: list[int] = []
        counts: list[int] = []
        indptr = [0]
        for text in texts:
            found: dict[int, int] = {}
            for term in analyze(text):
                column = vocabulary.get(term)
                if column is not None:
                    found[column] = found.get(column, 0) + 1
            columns.extend(found)
            counts.extend(found.values())
            indptr.append(len(columns))
        matrix = sparse.csr_matrix(
            (
                np.asarray(counts, dtype=np.intc),
                np.asarray(columns, dtype=np.int32),
                np.asarray(indptr, dtype=np.int32),
            ),
            shape=(len(indptr) - 1, len(vocabulary)),
            dtype=self.vectorizer.dtype,
        )
        matrix.sort_indices()
        data = matrix.data
        if self.vectorizer.sublinear_tf:
            np.log(data, data)
            data += 1.0
        if self._idf is not None:
            data *= self._idf[matrix.indices]
        if self.vectorizer.norm == "l2":
            inplace_csr_row_normalize_l2(matrix)
        return matrix


def save_vectorizer(vectorizer: Any, directory: Path, name: str) -> None:
    """`<name>.json` (constructor arguments + vocabulary) and `<name>_idf.npy`."""
    directory.mkdir(parents=True, exist_ok=True)
    payload = {
        "analyzer": vectorizer.analyzer,
        "ngram_range": list(vectorizer.ngram_range),
        "vocabulary": {term: int(i) for term, i in vectorizer.vocabulary_.items()},
    }
    (directory / f"{name}.json").write_text(json.dumps(payload, ensure_ascii=False))
    np.save(directory / f"{name}_idf.npy", np.asarray(vectorizer.idf_, dtype=np.float64))


def load_vectorizer(directory: Path, name: str) -> Any:
    """The vectorizer `save_vectorizer` wrote, ready to transform (identical output)."""
    payload = json.loads((directory / f"{name}.json").read_text())
    vectorizer = make_vectorizer(payload["analyzer"], payload["ngram_range"])
    vectorizer.set_params(vocabulary=payload["vocabulary"])
    vectorizer.idf_ = np.load(directory / f"{name}_idf.npy")
    return vectorizer
