"""benchmarks/scale.py's arithmetic on made-up measurements: sizes parse, the growth exponent and
the cost-per-row ratio are what the times imply, and the flags name a stage over the memory
ceiling or a cost per row that grows too fast. (The benchmark itself runs the whole pipeline at
tens of thousands of rows: far too slow for a test; its figures are in docs/results.md.)"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys

import pytest
from benchmarks import scale

from tests.support import REPO_ROOT

STAGES = ("embed", "train_gbdt")


def entry(n: int, seconds: dict[str, float], peak_gib: float = 1.0) -> dict:
    return {
        "n_train": n,
        "n_test": n,
        "image_share": 0.1,
        "commit": "abc",
        "dirty": False,
        "command": "python benchmarks/scale.py --sizes 1k",
        "date": "2026-12-03",
        "machine": "test",
        "stages": {
            stage: {"wall_s": t, "cpu_s": 2 * t, "peak_rss_bytes": peak_gib * scale.GIB}
            for stage, t in seconds.items()
        },
        "dvc_status": "Data and pipelines are up to date.",
        "images": 0.2 * n,
        "images_per_s": 10.0,
        "texts_per_s": 50.0,
        "smape_oof": 20.0,
    }


def test_sizes_parse_and_nonsense_is_refused() -> None:
    assert scale.parse_size("6k") == 6000
    assert scale.parse_size("75,000") == 75000
    assert scale.parse_size("2.5k") == 2500
    for bad in ("many", "50"):
        with pytest.raises(argparse.ArgumentTypeError):
            scale.parse_size(bad)


def test_growth_exponent_and_cost_per_row_follow_the_times() -> None:
    """embed linear (k = 1, cost per row flat), train_gbdt quadratic (k = 2, cost per row x3 for
    three times the rows): the table says so, and only the quadratic stage is flagged."""
    small = entry(10_000, {"embed": 100.0, "train_gbdt": 50.0})
    large = entry(30_000, {"embed": 300.0, "train_gbdt": 450.0}, peak_gib=9.0)
    table = scale.growth_table([small, large])
    rows = {row[0]: row[1:] for row in table["rows"]}
    assert rows["embed"] == pytest.approx([1.0, 1.0, 1.0])
    assert rows["train_gbdt"] == pytest.approx([2.0, 2.0, 3.0])
    whole = scale.exponent(150.0, 750.0, 20_000, 60_000)
    assert rows[scale.WHOLE][0] == pytest.approx(whole, abs=1e-3)

    flags = scale.flags([small, large])
    assert any("train_gbdt's CPU seconds per row grew 3.00x" in f for f in flags)
    assert not any("embed's" in f for f in flags)
    assert sum("(> 8 GiB)" in f for f in flags) == len(STAGES)  # both stages of the large run


def test_report_only_prints_every_table_from_the_measurements(tmp_path) -> None:
    out = tmp_path / "scale.json"
    sizes = {"1000": entry(1000, {"fetch_images": 2.0, "embed": 10.0}),
             "3000": entry(3000, {"fetch_images": 3.0, "embed": 30.0})}  # fmt: skip
    out.write_text(json.dumps(sizes))
    result = subprocess.run(
        [sys.executable, "benchmarks/scale.py", "--report-only", "--out", str(out)],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        check=True,
    )
    assert "1,000 train + 1,000 test rows" in result.stdout
    assert "3,000 train + 3,000 test rows" in result.stdout
    assert "Growth between sizes" in result.stdout
    assert "every row with an image" in result.stdout
