"""A benchmark's tables as one JSON file under docs/results/, the source of docs/results.md.

    from benchmarks.results import add_results_option, table, write_results

    add_results_option(parser, "catalog_parse")        # --results [NAME]
    ...
    if args.results:
        write_results(args.results, [table("Parse speed", ["rows", "rows/s"], [[6104, 2e5]])])

The file records, beside the tables, the command line that produced them, the commit (`git
rev-parse HEAD`, and whether the working tree had uncommitted changes outside benchmarks/ and
docs/), the date and the machine;
`python tools/results_tables.py --write` renders every file into docs/results.md between its
markers, so a figure in the docs is always one a benchmark wrote. Without --results a benchmark
only prints, as before: a run with other arguments never overwrites the published figures by
accident.

Only aggregate figures belong in these files (scores, timings, counts): never rows, texts, ids
or per-row predictions of the competition data, which must not leave the machine it is on.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import math
import os
import platform
import shlex
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
RESULTS_DIR = ROOT / "docs" / "results"
SOURCES = (".", ":!benchmarks", ":!docs", ":!README.md")  # `git status` pathspecs for "dirty"
MAX_TEXT_CELL = 80  # longer strings are refused: a label, not a row of data


def add_results_option(parser: argparse.ArgumentParser, name: str) -> None:
    """`--results [NAME]`: also write the tables to docs/results/NAME.json (default `name`)."""
    parser.add_argument(
        "--results",
        nargs="?",
        const=name,
        default=None,
        metavar="NAME",
        help=f"also write the tables to docs/results/NAME.json (NAME default: {name}) for "
        "docs/results.md (python tools/results_tables.py --write)",
    )


def table(
    title: str,
    columns: Sequence[str],
    rows: Sequence[Sequence[Any]],
    notes: str = "",
    formats: Sequence[str | None] | None = None,
) -> dict[str, Any]:
    """One table: `rows` of cells (str, int, float or None), one per column. `formats` gives a
    Python format spec per column (e.g. ".1f", ","; None: the default, floats with 2 decimals)."""
    out: dict[str, Any] = {"title": title, "columns": list(columns)}
    out["rows"] = [[_cell(value) for value in row] for row in rows]
    for i, row in enumerate(out["rows"]):
        if len(row) != len(columns):
            raise ValueError(f"{title}: row {i} has {len(row)} cells for {len(columns)} columns")
    if formats is not None:
        if len(formats) != len(columns):
            raise ValueError(f"{title}: {len(formats)} formats for {len(columns)} columns")
        out["formats"] = list(formats)
    out["notes"] = notes
    return out


def _cell(value: Any) -> str | int | float | None:
    if value is None or isinstance(value, bool | str):
        if isinstance(value, str) and len(value) > MAX_TEXT_CELL:
            raise ValueError(f"a text cell over {MAX_TEXT_CELL} characters: {value[:40]!r}...")
        return value if not isinstance(value, bool) else str(value).lower()
    if hasattr(value, "item"):  # numpy scalars
        value = value.item()
    if isinstance(value, int):
        return value
    number = float(value)
    if not math.isfinite(number):
        return None
    # Enough digits for any figure we print, few enough that a re-run's diff stays readable.
    return round(number, 4) if abs(number) >= 0.01 else float(f"{number:.3g}")


def _git(*args: str) -> str:
    try:
        out = subprocess.run(
            ["git", *args], cwd=ROOT, capture_output=True, text=True, check=True, timeout=30
        )
    except (OSError, subprocess.SubprocessError):
        return ""
    return out.stdout.strip()


def _command(argv: Sequence[str]) -> str:
    script = Path(argv[0]).resolve()
    shown = script.relative_to(ROOT) if script.is_relative_to(ROOT) else Path(argv[0])
    return shlex.join(["python", str(shown), *argv[1:]])


def machine() -> str:
    """Cores, platform and the load when the benchmark ended (the machine may be shared)."""
    load = ", ".join(f"{x:.1f}" for x in os.getloadavg())
    return (
        f"{os.cpu_count()} CPU cores, {platform.system()} {platform.machine()}, "
        f"Python {platform.python_version()}; load average {load} at the end"
    )


def dumps(value: Any, indent: int = 0) -> str:
    """JSON with one line per table row: a list of scalars stays on one line (readable diffs)."""
    pad, inner = " " * indent, " " * (indent + 1)
    if isinstance(value, dict) and value:
        items = [f"{inner}{json.dumps(k)}: {dumps(v, indent + 1)}" for k, v in value.items()]
        return "{\n" + ",\n".join(items) + f"\n{pad}}}"
    if isinstance(value, list) and any(isinstance(v, dict | list) for v in value):
        items = [f"{inner}{dumps(v, indent + 1)}" for v in value]
        return "[\n" + ",\n".join(items) + f"\n{pad}]"
    return json.dumps(value, ensure_ascii=False)


def write_results(
    name: str,
    tables: Sequence[dict[str, Any]],
    *,
    argv: Sequence[str] | None = None,
    directory: Path = RESULTS_DIR,
) -> Path:
    """Write docs/results/<name>.json: the tables with the command, commit, date and machine."""
    if not name or "/" in name or name.startswith("."):
        raise ValueError(f"a results name is a file stem, got {name!r}")
    argv = list(sys.argv if argv is None else argv)
    payload = {
        "benchmark": Path(argv[0]).stem,
        "command": _command(argv),
        "commit": _git("rev-parse", "HEAD") or "unknown",
        # Uncommitted changes to what decides the figures (code, params, pipeline): the
        # benchmarks' own output code and the docs do not count.
        "dirty": bool(_git("status", "--porcelain", "--untracked-files=no", "--", *SOURCES)),
        "date": dt.datetime.now(dt.UTC).date().isoformat(),
        "machine": machine(),
        "tables": list(tables),
    }
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / f"{name}.json"
    path.write_text(dumps(payload) + "\n", encoding="utf-8")
    print(f"wrote {path.relative_to(ROOT) if path.is_relative_to(ROOT) else path}")
    return path
