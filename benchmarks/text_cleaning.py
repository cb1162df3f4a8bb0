"""The preprocess text options and the training-price outlier filter on the real train rows.

    python benchmarks/text_cleaning.py                          # linear member, both views
    python benchmarks/text_cleaning.py --heads minilm tabular   # (MiniLM: slow once, cached)
    python benchmarks/text_cleaning.py --heads linear_name linear_text minilm tabular --results

Per option (`off` = every option off, whatever params.yaml sets; each text option alone; the
outlier filter at 0.5% and 1%): how many rows' text it changes and the 5-fold OOF SMAPE (%, on
prices) of each head in --heads:
  linear_name / linear_text  the pipeline's linear member (`pricefuse.models.linear.member`,
                             params.yaml's `linear:` but the view) on the `name` / `text` view;
  minilm                     RidgeCV on the default text tower's (`embed.text_model`) embeddings
                             of `text`;
  tabular                    LightGBM (params.yaml's gbdt.lightgbm, n_estimators, learning rate,
                             no early stopping) on `parsed_features`, the boosters' parsed
                             columns (their name features read the name as written, so no
                             text option changes them; the outlier filter does).
Rows, parsing and folds are the pipeline's: `read_raw`, `clean_prices`, `parse_frame`,
`assign_folds` (on the text as written, as preprocess does, so every option scores on the same
folds), then `clean_parsed` with the option. The outlier filter drops rows of the training
folds only (quantiles of the training folds' prices, `price_outliers`); every held-out row is
scored, outliers included, or the figure would flatter the filter. Embeddings are cached per
text under --cache, so each distinct text is encoded once over all options and re-runs.
Image keys are the raw links (no manifest is read). Prints figures; not a test.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pandas as pd

from pricefuse.core.config import GbdtConfig, LinearConfig, PreprocessConfig, load_params
from pricefuse.core.layout import FOLD, LOG_PRICE, TEXT
from pricefuse.core.metrics import smape_from_log
from pricefuse.data.catalog import parse_frame
from pricefuse.data.preprocess import assign_folds, clean_prices, price_outliers
from pricefuse.data.raw import read_raw
from pricefuse.data.text_clean import TEXT_OPTIONS_OFF, changed_rows, clean_parsed
from pricefuse.features.tabular import parsed_features
from pricefuse.models.linear.predictor import LinearPredictor

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from benchmarks.results import add_results_option, table, write_results  # noqa: E402

TRAIN_CSV = ROOT.parent / "shared" / "data" / "amazon2025" / "train.csv"
ALPHAS = np.logspace(-2, 2, 9)
# option label -> (preprocess overrides); the outlier filter is applied per training fold below
OPTIONS: dict[str, dict[str, object]] = {
    "off": {},
    "remove_emoji": {"remove_emoji": True},
    "numbers_as_words": {"numbers_as_words": True},
    "text_body=bullets5": {"text_body": "bullets5"},
    "text_body=description": {"text_body": "description"},
    "outlier_quantile=0.005": {"outlier_quantile": 0.005},
    "outlier_quantile=0.01": {"outlier_quantile": 0.01},
}

ALL_OFF: dict[str, object] = {"outlier_quantile": 0.0, **TEXT_OPTIONS_OFF}
FitPredict = Callable[[np.ndarray, np.ndarray], np.ndarray]  # (train idx, held idx) -> log preds
HEADS = ("linear_name", "linear_text", "minilm", "tabular")
HEAD_LABELS = {
    "linear_name": "linear, name view",
    "linear_text": "linear, text view",
    "minilm": "MiniLM ridge",
    "tabular": "tabular LightGBM",
}


def load_rows(csv: Path, cfg: PreprocessConfig, seed: int) -> pd.DataFrame:
    """Train rows parsed and folded as preprocess does, text options off."""
    train, _ = clean_prices(read_raw(csv, "train"), cfg.min_price)
    parsed, _ = parse_frame(train)
    parsed[FOLD], _ = assign_folds(parsed, cfg.n_folds, seed)
    return parsed


def oof(y: np.ndarray, folds: np.ndarray, quantile: float, fit_predict: FitPredict) -> np.ndarray:
    """OOF log predictions; each fold's training rows lose their price outliers (if any)."""
    pred = np.zeros_like(y)
    for k in np.unique(folds):
        train = np.flatnonzero(folds != k)
        train = train[~price_outliers(np.expm1(y[train]), quantile)]
        held = np.flatnonzero(folds == k)
        pred[held] = fit_predict(train, held)
    return pred


def linear_fit_predict(cfg: LinearConfig, parsed: pd.DataFrame, y: np.ndarray) -> FitPredict:
    def fit_predict(train: np.ndarray, held: np.ndarray) -> np.ndarray:
        model = LinearPredictor.fit(cfg, parsed.iloc[train], y[train])
        return model.predict(parsed.iloc[held])

    return fit_predict


def tabular_fit_predict(
    gbdt: GbdtConfig, parsed: pd.DataFrame, y: np.ndarray, seed: int
) -> FitPredict:
    import lightgbm

    features = parsed_features(parsed).to_numpy(np.float64)

    def fit_predict(train: np.ndarray, held: np.ndarray) -> np.ndarray:
        model = lightgbm.LGBMRegressor(
            n_estimators=gbdt.n_estimators,
            learning_rate=gbdt.learning_rate,
            num_leaves=gbdt.lightgbm.num_leaves,
            min_child_samples=gbdt.lightgbm.min_child_samples,
            random_state=seed,
            verbose=-1,
        )
        return model.fit(features[train], y[train]).predict(features[held])

    return fit_predict


def ridge_fit_predict(emb: np.ndarray, y: np.ndarray) -> FitPredict:
    from sklearn.linear_model import RidgeCV

    def fit_predict(train: np.ndarray, held: np.ndarray) -> np.ndarray:
        return RidgeCV(alphas=ALPHAS).fit(emb[train], y[train]).predict(emb[held])

    return fit_predict


class EmbeddingCache:
    """The default text tower's embeddings, one per distinct text, kept in one .npz per tower."""

    def __init__(self, ref: str, max_length: int, batch_size: int, directory: Path) -> None:
        self.ref, self.max_length, self.batch_size = ref, max_length, batch_size
        stem = hashlib.sha256(f"{ref}|{max_length}".encode()).hexdigest()[:12]
        self.path = directory / f"embeddings-{stem}.npz"
        self.vectors: dict[str, np.ndarray] = {}
        if self.path.is_file():
            stored = np.load(self.path)
            self.vectors = dict(zip(stored["keys"].tolist(), stored["vectors"], strict=True))
        self.encoder = None

    @staticmethod
    def key(text: str) -> str:
        return hashlib.sha256(text.encode()).hexdigest()

    def embed(self, texts: list[str]) -> np.ndarray:
        keys = [self.key(t) for t in texts]
        todo = {k: t for k, t in zip(keys, texts, strict=True) if k not in self.vectors}
        if todo:
            from pricefuse.features.text import TextEncoder

            if self.encoder is None:
                self.encoder = TextEncoder.from_ref(self.ref, self.max_length, self.batch_size)
            started = time.perf_counter()
            vectors = self.encoder.encode(list(todo.values()), progress=True)
            print(f"  encoded {len(todo)} texts in {time.perf_counter() - started:.0f}s")
            self.vectors.update(zip(todo, vectors, strict=True))
            self.path.parent.mkdir(parents=True, exist_ok=True)
            np.savez(
                self.path,
                keys=np.array(list(self.vectors)),
                vectors=np.stack(list(self.vectors.values())),
            )
        return np.stack([self.vectors[k] for k in keys])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--csv", type=Path, default=TRAIN_CSV)
    parser.add_argument("--heads", nargs="+", default=list(HEADS[:2]), choices=HEADS)
    parser.add_argument("--options", nargs="+", default=list(OPTIONS), choices=list(OPTIONS))
    parser.add_argument("--cache", type=Path, default=Path("/tmp/pricefuse-text-cleaning"))
    add_results_option(parser, "text_cleaning")
    args = parser.parse_args()

    params = load_params(ROOT / "params.yaml")
    # Every option off, whatever params.yaml turns on: each row of the table is one option alone.
    base = dataclasses.replace(params.preprocess, **ALL_OFF)
    parsed = load_rows(args.csv, base, params.seed)
    y = parsed[LOG_PRICE].to_numpy(np.float64)
    folds = parsed[FOLD].to_numpy()
    embed = params.embed
    cache = EmbeddingCache(
        embed.text_model, embed.text_max_length, embed.text_batch_size, args.cache
    )

    def head(name: str, table: pd.DataFrame) -> FitPredict:
        if name.startswith("linear_"):
            view = dataclasses.replace(params.linear, view=name.removeprefix("linear_"))
            return linear_fit_predict(view, table, y)
        if name == "minilm":
            return ridge_fit_predict(cache.embed(table[TEXT].tolist()), y)
        return tabular_fit_predict(params.gbdt, table, y, params.seed)

    print(
        f"{len(y)} train rows, {len(np.unique(folds))} group folds of "
        f"{np.bincount(folds).tolist()} rows; OOF SMAPE (%) on every held-out row"
    )
    lines = [f"{'option':<24} {'changed':>8} " + " ".join(f"{h:>12}" for h in args.heads)]
    lines[0] += f" {'seconds':>8}"
    print(lines[0], flush=True)
    rows = []
    for label in args.options:
        started = time.perf_counter()
        cfg = dataclasses.replace(base, **OPTIONS[label])
        cleaned = clean_parsed(parsed, cfg)
        scores = [
            smape_from_log(y, oof(y, folds, cfg.outlier_quantile, head(name, cleaned)))
            for name in args.heads
        ]
        line = f"{label:<24} {changed_rows(parsed, cleaned):>8} " + " ".join(
            f"{score:>12.3f}" for score in scores
        )
        lines.append(f"{line} {time.perf_counter() - started:>8.0f}")
        print(lines[-1], flush=True)
        rows.append([label, changed_rows(parsed, cleaned), *scores])
    print("\n".join(lines))
    if args.results:
        title = (
            f"OOF SMAPE (%) per preprocess option alone, {len(y):,} real train rows, "
            f"{len(np.unique(folds))} group folds, every held-out row scored"
        )
        columns = ["option", "rows changed", *(HEAD_LABELS[h] for h in args.heads)]
        write_results(args.results, [table(title, columns, rows)])


if __name__ == "__main__":
    main()
