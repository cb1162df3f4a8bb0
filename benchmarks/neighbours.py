"""Time the neighbour-price features (pricefuse.models.neighbours.predictor) at competition scale.

    python benchmarks/neighbours.py                      # 75,000 train x 75,000 test rows
    python benchmarks/neighbours.py --rows 5000          # a quick check
    python benchmarks/neighbours.py --spaces tfidf_name text_embedding --folds 5 --k 10
    python benchmarks/neighbours.py --results            # also docs/results/neighbours.json

What is timed, per space on its own (a single-space NeighboursConfig) and for all the chosen
spaces together:
  OOF   `oof_features(cfg, train, log_prices, folds)`: one index per fold, fitted on the other
        folds (TF-IDF vocabularies included) and queried with the held-out fold;
  test  `NeighbourIndex.fit(cfg, train, log_prices)` + `.features(test)`: every test row against
        every train row ("fit s" is the fit part of it).
The search uses `neighbours.n_jobs` cores (params.yaml; --n-jobs overrides it): worker processes
for the TF-IDF spaces, faiss threads for the embeddings. "CPU s" counts this process and its
workers. Peak RSS is the process's high-water mark (resource.getrusage) after each run, so it only
grows; "all RSS" and "all PSS" are the peaks, within each run, of the sums over this process and
its worker processes (sampled every 0.1 s from /proc: RSS counts the pages the forked workers
share with this process once per process, PSS splits them, so the true total lies between).

The rows are synthetic, built in well under a minute and not part of any figure (the demo
generator renders an image per row, too slow at this size): product families (brand + name words,
~2 listings each, other sizes and pack counts) over a Zipf-distributed pseudo-word vocabulary,
plus bullet/description text made of reused phrases. Calibrated on the 6,104 real train rows
(unigram+bigram TF-IDF as the index fits it), synthetic vs real: text view median 82 vs 82
words, vocabulary 260k vs 252k terms, 216 vs 176 terms a row; name view vocabulary 40k vs 49k,
28 vs 25 terms a row. Embeddings: random 384-d text vectors and 1280-d image vectors for 9% of
rows (as in the real data), drawn around 3,000 centroids (one per family) so the search is not
degenerate. Log prices are random: search cost does not depend on them.

Figures depend on the machine (cores, BLAS, memory bandwidth) and on its load; they are printed,
not asserted. Not a test.
"""

from __future__ import annotations

import os

# libgomp (faiss, scikit-learn) reads this once, when it loads: set it before those imports.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import argparse
import resource
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TypeVar

import numpy as np
import pandas as pd

from pricefuse.core.config import NeighboursConfig, load_params
from pricefuse.models.neighbours.predictor import NeighbourIndex
from pricefuse.models.neighbours.search import SPACES, NeighbourRows, resolve_n_jobs
from pricefuse.models.neighbours.training import oof_features

T = TypeVar("T")

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from benchmarks.results import add_results_option, table, write_results  # noqa: E402

SEED = 20250
VOCABULARY = 60_000  # pseudo-words
BRANDS = 5_000
PRODUCTS_PER_ROW = 0.5  # product families: each is listed ~twice (other sizes, packs, sellers)
NAME_WORDS = (7.0, 0.6)  # lognormal (median, sigma) of the words after brand, before size
PHRASES = 80_000  # bullet and description phrases, reused across rows as in the real catalogue
PHRASE_WORDS = (6.0, 0.5)
EXTRA_PHRASES = (10.0, 0.95)  # per row: ~70 words (real text: median 82, mean 129 words)
MAX_EXTRA_PHRASES = 160
# Zipf-Mandelbrot weights 1 / (rank + shift): small shifts give a few words in most rows.
WORD_SHIFT, NAME_WORD_SHIFT, PHRASE_SHIFT = 2.7, 50.0, 10.0
TEXT_DIM, IMAGE_DIM = 384, 1280
CENTROIDS = 3_000
IMAGE_RATE = 0.09
UNITS = (("ounce", "Ounce"), ("fl_oz", "Fl Oz"), ("count", "Count"), ("pound", "Pound"))
SIZES = (1.0, 1.5, 2.5, 4.0, 8.0, 12.0, 16.0, 24.0, 32.0, 50.0, 100.0)
PACKS = (1, 1, 1, 1, 2, 3, 4, 6, 12, 24)
SYLLABLES = tuple(
    c + v
    for c in ("b", "ch", "d", "f", "g", "k", "l", "m", "n", "p", "r", "s", "t", "v", "z")
    for v in ("a", "e", "i", "o", "u", "ai", "ou")
)


@dataclass(frozen=True)
class Timing:
    space: str
    oof_shape: str
    oof_s: float
    test_shape: str
    test_s: float
    fit_s: float
    cpu_s: float  # CPU time of OOF + test, all threads and workers: below wall x cores = waiting
    peak_gib: float
    all_rss_gib: float
    all_pss_gib: float


def timed(fn: Callable[[], T]) -> tuple[T, float]:
    start = time.perf_counter()
    result = fn()
    return result, time.perf_counter() - start


def peak_rss_gib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux


def cpu_seconds() -> float:
    """CPU time of this process and of its finished (waited-for) worker processes."""
    children = resource.getrusage(resource.RUSAGE_CHILDREN)
    return time.process_time() + children.ru_utime + children.ru_stime


def _kib(path: str, fields: tuple[str, ...]) -> dict[str, int]:
    """The named `Field:   N kB` lines of a /proc file (zeros where it is gone or lacks them)."""
    found = dict.fromkeys(fields, 0)
    try:
        with open(path) as handle:
            for line in handle:
                name, _, rest = line.partition(":")
                if name in found:
                    found[name] = int(rest.split()[0])
    except (OSError, ValueError, IndexError):
        pass
    return found


class TreeMemory:
    """Peak RSS and PSS summed over this process and its child processes, sampled in a thread
    (Linux /proc; elsewhere it reports zeros). `reset()` starts a new peak."""

    def __init__(self, interval: float = 0.1) -> None:
        self.interval = interval
        self.peak_rss = self.peak_pss = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _children(self, pid: int) -> list[int]:
        out = []
        for entry in Path("/proc").iterdir():
            if entry.name.isdigit():
                try:
                    stat = (entry / "stat").read_text()
                except OSError:
                    continue
                if int(stat.rsplit(")", 1)[1].split()[1]) == pid:  # field 4: ppid
                    out.append(int(entry.name))
        return out

    def sample(self) -> None:
        pid = os.getpid()
        rss = pss = 0
        for p in (pid, *self._children(pid)):
            kib = _kib(f"/proc/{p}/smaps_rollup", ("Rss", "Pss"))
            rss, pss = rss + kib["Rss"], pss + kib["Pss"]
        self.peak_rss, self.peak_pss = max(self.peak_rss, rss), max(self.peak_pss, pss)

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            self.sample()

    def reset(self) -> None:
        self.peak_rss = self.peak_pss = 0
        self.sample()

    def peaks_gib(self) -> tuple[float, float]:
        self.sample()
        return self.peak_rss / 2**20, self.peak_pss / 2**20


def pseudo_words(rng: np.random.Generator, n: int, capitalise: bool = False) -> np.ndarray:
    """n distinct words of 2-4 syllables, in random order."""
    words: set[str] = set()
    while len(words) < n:
        for length in rng.integers(2, 5, size=n - len(words)):
            word = "".join(SYLLABLES[i] for i in rng.integers(len(SYLLABLES), size=length))
            words.add(word.capitalize() if capitalise else word)
    return rng.permutation(np.array(sorted(words), dtype=object))


def zipf_join(
    rng: np.random.Generator, items: np.ndarray, counts: np.ndarray, shift: float
) -> np.ndarray:
    """One string per count: that many `items` (words or phrases) drawn by Zipf weight."""
    weights = 1.0 / (np.arange(len(items)) + shift)
    drawn = items[rng.choice(len(items), size=int(counts.sum()), p=weights / weights.sum())]
    parts = np.split(drawn, np.cumsum(counts)[:-1])
    return np.array([" ".join(part) for part in parts], dtype=object)


def lognormal_lengths(
    rng: np.random.Generator, n: int, median_sigma: tuple[float, float], cap: int
) -> np.ndarray:
    median, sigma = median_sigma
    return np.clip(np.round(rng.lognormal(np.log(median), sigma, size=n)), 1, cap).astype(int)


def clustered(rng: np.random.Generator, centroids: np.ndarray, which: np.ndarray) -> np.ndarray:
    """Rows drawn around the given centroids (float32, unit-variance noise at half the scale)."""
    noise = rng.standard_normal((len(which), centroids.shape[1]), dtype=np.float32)
    return centroids[which] + np.float32(0.5) * noise


def parsed_text(rng: np.random.Generator, product: np.ndarray, n_products: int) -> pd.DataFrame:
    """The parsed columns `text_view` reads, one row per entry of `product` (family ids)."""
    n = len(product)
    vocabulary = pseudo_words(rng, VOCABULARY)
    brands = pseudo_words(rng, BRANDS, capitalise=True)
    name_counts = lognormal_lengths(rng, n_products, NAME_WORDS, 40)
    product_names = zipf_join(rng, vocabulary, name_counts, NAME_WORD_SHIFT)
    product_brand = brands[rng.integers(len(brands), size=n_products)]
    phrases = zipf_join(
        rng, vocabulary, lognormal_lengths(rng, PHRASES, PHRASE_WORDS, 20), WORD_SHIFT
    )
    extra_counts = lognormal_lengths(rng, n, EXTRA_PHRASES, MAX_EXTRA_PHRASES)
    extra = zipf_join(rng, phrases, extra_counts, PHRASE_SHIFT)
    unit = rng.integers(len(UNITS), size=n)
    size = np.array(SIZES)[rng.integers(len(SIZES), size=n)]
    pack = np.array(PACKS)[rng.integers(len(PACKS), size=n)]
    item_names = [
        f"{product_brand[p]} {product_names[p]}, {s:g} {UNITS[u][1]}"
        + (f" (Pack of {k})" if k > 1 else "")
        for p, u, s, k in zip(product, unit, size, pack, strict=True)
    ]
    return pd.DataFrame(
        {
            "item_name": item_names,
            "value": size * pack,
            "unit": [UNITS[u][0] for u in unit],
            "pack": pack,
            "text": [f"{name} {words}" for name, words in zip(item_names, extra, strict=True)],
        }
    )


def synthetic_rows(n: int, seed: int) -> tuple[NeighbourRows, np.ndarray]:
    """(rows, log prices): n catalogue rows with parsed text columns and embeddings; rows of one
    product family share name words and embedding cluster."""
    rng = np.random.default_rng(seed)
    n_products = max(int(n * PRODUCTS_PER_ROW), 1)
    product = rng.integers(n_products, size=n)
    parsed = parsed_text(rng, product, n_products)
    cluster = rng.integers(CENTROIDS, size=n_products)[product]
    text = clustered(rng, rng.standard_normal((CENTROIDS, TEXT_DIM), dtype=np.float32), cluster)
    image_mask = rng.random(n) < IMAGE_RATE
    image = np.zeros((n, IMAGE_DIM), dtype=np.float32)
    image_centroids = rng.standard_normal((CENTROIDS, IMAGE_DIM), dtype=np.float32)
    image[image_mask] = clustered(rng, image_centroids, cluster[image_mask])
    log_prices = rng.normal(2.7, 1.0, size=n)
    return NeighbourRows(parsed, text, image, image_mask), log_prices


def participating(space: str, rows: NeighbourRows) -> int:
    """Rows that take part in a space's search (only rows with an image in `image`)."""
    return int(np.count_nonzero(rows.image_mask)) if space == "image" else len(rows)


def shape(queries: int, keys: float) -> str:
    return f"{queries:,} × {round(keys):,}"


def measure(
    label: str,
    cfg: NeighboursConfig,
    train: NeighbourRows,
    test: NeighbourRows,
    values: np.ndarray,
    folds: np.ndarray,
    memory: TreeMemory,
) -> Timing:
    """Time OOF features and test features (fit + query) for one config; print progress."""
    memory.reset()
    start, cpu_start = time.perf_counter(), cpu_seconds()

    def fold_done(k: int) -> None:
        print(f"  {label}: fold {k} done at {time.perf_counter() - start:.1f} s", flush=True)

    _, oof_s = timed(lambda: oof_features(cfg, train, values, folds, on_fold_done=fold_done))
    index, fit_s = timed(lambda: NeighbourIndex.fit(cfg, train, values))
    _, query_s = timed(lambda: index.features(test))
    keys = max(participating(space, train) for space in cfg.spaces)
    queries = max(participating(space, test) for space in cfg.spaces)
    n_folds = len(np.unique(folds))
    all_rss, all_pss = memory.peaks_gib()
    timing = Timing(
        space=label,
        oof_shape=shape(keys, keys * (n_folds - 1) / n_folds),
        oof_s=oof_s,
        test_shape=shape(queries, keys),
        test_s=fit_s + query_s,
        fit_s=fit_s,
        cpu_s=cpu_seconds() - cpu_start,
        peak_gib=peak_rss_gib(),
        all_rss_gib=all_rss,
        all_pss_gib=all_pss,
    )
    print(
        f"  {label}: OOF {oof_s:.1f} s, test {timing.test_s:.1f} s (fit {fit_s:.1f} s), "
        f"CPU {timing.cpu_s:.1f} s, peak RSS {timing.peak_gib:.2f} GiB "
        f"(with workers: RSS {all_rss:.2f}, PSS {all_pss:.2f} GiB)",
        flush=True,
    )
    return timing


def warm_up(cfg: NeighboursConfig, train: NeighbourRows, values: np.ndarray) -> None:
    """One tiny fit + query, untimed: library imports and first calls are not the figure."""
    few = np.arange(min(len(train), 50))
    NeighbourIndex.fit(cfg, train.take(few), values[few]).features(train.take(few))


# (header, cell, left-aligned) per table column
COLUMNS: tuple[tuple[str, Callable[[Timing], str], bool], ...] = (
    ("space", lambda t: t.space, True),
    ("OOF rows × keys", lambda t: t.oof_shape, True),
    ("OOF s", lambda t: f"{t.oof_s:.1f}", False),
    ("test rows × keys", lambda t: t.test_shape, True),
    ("test s", lambda t: f"{t.test_s:.1f}", False),
    ("of which fit s", lambda t: f"{t.fit_s:.1f}", False),
    ("CPU s", lambda t: f"{t.cpu_s:.1f}", False),
    ("peak RSS GiB", lambda t: f"{t.peak_gib:.2f}", False),
    ("all RSS GiB", lambda t: f"{t.all_rss_gib:.2f}", False),
    ("all PSS GiB", lambda t: f"{t.all_pss_gib:.2f}", False),
)


def print_table(timings: list[Timing]) -> None:
    table = [[header for header, _, _ in COLUMNS]]
    table += [[cell(t) for _, cell, _ in COLUMNS] for t in timings]
    widths = [max(len(row[i]) for row in table) for i in range(len(COLUMNS))]
    for row in table:
        cells = [
            text.ljust(width) if left else text.rjust(width)
            for text, width, (_, _, left) in zip(row, widths, COLUMNS, strict=True)
        ]
        print("  ".join(cells).rstrip())


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=75_000, help="train rows (default 75,000)")
    parser.add_argument("--test-rows", type=int, default=None, help="test rows (default --rows)")
    parser.add_argument("--spaces", nargs="+", choices=SPACES, default=list(SPACES))
    parser.add_argument("--folds", type=int, default=5)
    parser.add_argument("--k", type=int, default=10, help="neighbours per row")
    parser.add_argument("--seed", type=int, default=SEED)
    parser.add_argument(
        "--n-jobs", type=int, default=None, help="cores (default neighbours.n_jobs; 0 = all)"
    )
    add_results_option(parser, "neighbours")
    return parser.parse_args()


def main() -> None:
    args = parse_args()
    n_train = args.rows
    n_test = args.rows if args.test_rows is None else args.test_rows
    (rows, values), build_s = timed(lambda: synthetic_rows(n_train + n_test, args.seed))
    train = rows.take(np.arange(n_train))
    test = rows.take(np.arange(n_train, n_train + n_test))
    train_values = values[:n_train]
    folds = np.random.default_rng(args.seed).permutation(n_train) % args.folds
    print(
        f"synthetic rows: {n_train:,} train + {n_test:,} test "
        f"({int(train.image_mask.sum()):,} + {int(test.image_mask.sum()):,} with an image), "
        f"built in {build_s:.1f} s (not part of the figures); {args.folds} folds, k = {args.k}",
        flush=True,
    )

    params = load_params(ROOT / "params.yaml")
    cfg = replace(params.neighbours, spaces=tuple(args.spaces), k=args.k)
    if args.n_jobs is not None:
        cfg = replace(cfg, n_jobs=args.n_jobs)
    print(
        f"n_jobs {cfg.n_jobs}: {resolve_n_jobs(cfg.n_jobs)} of {os.cpu_count()} cores", flush=True
    )
    warm_up(cfg, train, train_values)
    memory = TreeMemory()
    rss, pss = memory.peaks_gib()
    print(f"before the runs (the synthetic rows): RSS {rss:.2f} GiB, PSS {pss:.2f} GiB", flush=True)
    configs = [(space, replace(cfg, spaces=(space,))) for space in cfg.spaces]
    if len(cfg.spaces) > 1:
        configs.append(("all together", cfg))
    timings = [
        measure(label, space_cfg, train, test, train_values, folds, memory)
        for label, space_cfg in configs
    ]

    print(f"\nneighbour features, {n_train:,} train × {n_test:,} test rows:")
    print_table(timings)
    single = timings[: len(cfg.spaces)]
    total = timings[-1]
    print(
        f"\ntotal for {n_train:,} × {n_test:,} ({', '.join(cfg.spaces)}): "
        f"OOF {total.oof_s:.1f} s + test {total.test_s:.1f} s = "
        f"{total.oof_s + total.test_s:.1f} s "
        f"(sum of single-space runs {sum(t.oof_s + t.test_s for t in single):.1f} s); "
        f"peak RSS {peak_rss_gib():.2f} GiB (with workers, within a run: RSS "
        f"{max(t.all_rss_gib for t in timings):.2f}, "
        f"PSS {max(t.all_pss_gib for t in timings):.2f} GiB)"
    )
    if args.results:
        title = (
            f"Neighbour features on synthetic rows, {n_train:,} train × {n_test:,} test, "
            f"{args.folds} folds, k = {args.k}"
        )
        columns = [header for header, _, _ in COLUMNS]
        rows = [[cell(t) for _, cell, _ in COLUMNS] for t in timings]
        numeric = [[r[0], r[1], *map(float, r[2:3]), r[3], *map(float, r[4:])] for r in rows]
        formats = [None, None, ".1f", None, ".1f", ".1f", ".1f", ".2f", ".2f", ".2f"]
        write_results(args.results, [table(title, columns, numeric, formats=formats)])


if __name__ == "__main__":
    main()
