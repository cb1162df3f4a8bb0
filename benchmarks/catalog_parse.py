"""Time `parse_frame` (the preprocess stage's catalog parser) on the real train rows.

    python benchmarks/catalog_parse.py                        # ../shared/data/amazon2025/train.csv
    python benchmarks/catalog_parse.py --csv data/raw/train.csv --repeat 3
    python benchmarks/catalog_parse.py --results            # also docs/results/catalog_parse.json

tests/real/test_real_catalog.py checks what it parses (unit coverage, packs, quantities); this
prints how fast: rows/s, best of --repeat runs, then the time of one hostile row per size (a
pack count followed by a long run of spaces: a served request may hold anything, so parsing
must stay linear in the text's length). Without the real rows it times synthetic
`format_catalog` rows instead (say so in any figure you quote). Figures depend on the machine
and its load; not a test.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd

from pricefuse.data.catalog import format_catalog, parse_frame

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.results import add_results_option, table, write_results  # noqa: E402

REAL_TRAIN = ROOT.parent / "shared" / "data" / "amazon2025" / "train.csv"
UNITS = ("Ounce", "Fl Oz", "Count", "gram", "Pound", "ml", "oz", None)


def synthetic(rows: int) -> pd.DataFrame:
    rng = np.random.default_rng(0)
    texts = [
        format_catalog(
            f"Brand{i % 500} Item {i}, {rng.integers(1, 40)} Ounce (Pack of {rng.integers(1, 9)})",
            [f"bullet {j} about product {i}" for j in range(rng.integers(0, 6))],
            "A description. " * int(rng.integers(0, 20)),
            value=None if i % 17 == 0 else float(rng.integers(1, 500)) / 4,
            unit=UNITS[i % len(UNITS)],
        )
        for i in range(rows)
    ]
    return pd.DataFrame({"sample_id": np.arange(rows), "catalog_content": texts})


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--csv", type=Path, default=REAL_TRAIN)
    parser.add_argument("--rows", type=int, default=75_000, help="synthetic rows (no --csv)")
    parser.add_argument("--repeat", type=int, default=3)
    add_results_option(parser, "catalog_parse")
    args = parser.parse_args()
    if args.csv.exists():
        raw, source = pd.read_csv(args.csv), str(args.csv)
        kind = "the real train rows" if args.csv == REAL_TRAIN else "the rows of --csv"
    else:
        raw, source = synthetic(args.rows), f"synthetic rows ({args.csv} not found)"
        kind = "synthetic rows (format_catalog)"
    best = float("inf")
    for _ in range(args.repeat):
        started = time.perf_counter()
        _, report = parse_frame(raw)
        best = min(best, time.perf_counter() - started)
    print(f"{source}: {len(raw)} rows, unit coverage {report.unit_coverage:.3f}")
    print(f"parse_frame: {best:.2f} s (best of {args.repeat}), {len(raw) / best:,.0f} rows/s")
    hostile_rows = []
    for spaces in (16_000, 1_000_000):
        hostile = pd.DataFrame({"catalog_content": ["Item Name: 1" + " " * spaces + "z"]})
        started = time.perf_counter()
        parse_frame(hostile)
        seconds = time.perf_counter() - started
        hostile_rows.append([f"pack digit + {spaces:,} spaces", seconds])
        print(f"hostile row, pack digit + {spaces:,} spaces: {seconds:.3f} s")
    if args.results:
        write_results(
            args.results,
            [
                table(
                    f"`parse_frame` on {kind}, best of {args.repeat} runs",
                    ["rows", "unit coverage", "seconds", "rows/s"],
                    [[len(raw), report.unit_coverage, best, len(raw) / best]],
                    formats=[None, ".3f", ".2f", ",.0f"],
                ),
                table(
                    "One hostile row (parsing must stay linear in the text's length)",
                    ["row", "seconds"],
                    hostile_rows,
                    formats=[None, ".3f"],
                ),
            ],
        )


if __name__ == "__main__":
    main()
