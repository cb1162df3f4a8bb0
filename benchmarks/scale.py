"""The whole pipeline at competition scale: seconds, CPU seconds, peak memory and growth per stage.

    python benchmarks/scale.py --sizes 6k 25k                 # 6,000 + 6,000 and 25,000 + 25,000
    python benchmarks/scale.py --sizes 75k                    # the competition: 75,000 + 75,000
    python benchmarks/scale.py --sizes 2k --image-share 1.0   # every row with an image
    python benchmarks/scale.py --sizes 6k 25k 75k --results   # also docs/results/scale.json

Each size N is a fresh copy of the project (`tests.support.copy_project`: code, pipeline and
params.yaml as they are, in a new git + DVC repo, the installed environment) whose raw rows come
from the project's demo generator at N train + N test rows (`--test-ratio`) with competition-like
texts (`demo.long_text`: median ~630 characters, bullets, descriptions, the unit spellings),
images of 384 px (the fetch cache's size) on a share of the rows (`--image-share`, default 0.1,
`demo.image_share`). Then every stage of `dvc repro` runs in pipeline order, one
`dvc repro --single-item <stage>` at a time so each is measured on its own, and `dvc status`
must report the pipeline up to date afterwards.

Per stage: wall seconds, CPU seconds (user + system of the stage's processes, workers included),
the peak resident memory of its largest process, rows/s ((train + test rows) / wall), and between
consecutive sizes the growth exponent k of time ~ rows^k with the ratio of the cost per row (the
target: <= 1.5 from 25k to 75k for every stage but the exact neighbour search). The embed stage's
own metrics give the seconds per image, from which the all-images time is estimated.

Measurements accumulate in `--out` (JSON, one entry per size with its commit), so sizes run at
different times (the 75k run takes over an hour) still form one table; tables are printed from
everything in that file. Figures depend on the machine and its load; not a test.
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import os
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # as the Makefile exports it
os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
os.environ.setdefault("DVC_NO_ANALYTICS", "1")

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.results import _git, add_results_option, machine, table, write_results  # noqa: E402

from pricefuse.stages import STAGES  # noqa: E402
from tests.support import copy_project, run_cmd  # noqa: E402

GIB = 1024**3
RSS_CEILING = 8 * GIB  # the bound on any stage's peak memory at 75k + 75k
GROWTH_LIMIT = 1.5  # cost per row may grow at most this much between sizes (not exact kNN)
IMAGE_SIZE = 384  # what fetch.max_side leaves a real image at
WHOLE = "whole dvc repro"


def parse_size(text: str) -> int:
    """'6k' -> 6000, '75000' -> 75000."""
    value = text.lower().replace(",", "").replace("_", "")
    scale = 1000 if value.endswith("k") else 1
    try:
        rows = int(float(value.rstrip("k")) * scale)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"a size is a row count like 6k or 25000: {text}") from exc
    if rows < 100:
        raise argparse.ArgumentTypeError(f"at least 100 train rows, got {text}")
    return rows


def measured(command: list[str], cwd: Path, log: Path) -> dict[str, float]:
    """Run `command` to completion; its wall and CPU seconds and the peak RSS (bytes) of its
    largest process, the processes it waited for included (os.wait4's rusage).

    The stages import the project copy's code (PYTHONPATH), not the checkout the environment
    was installed from: a long run measures the code it started with, whatever is edited since.
    """
    env = dict(os.environ)
    env.pop("MLFLOW_TRACKING_URI", None)  # the copy's own sqlite store
    env["PYTHONPATH"] = str(cwd / "src")
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env['PATH']}"
    started = time.perf_counter()
    with log.open("w") as out:
        process = subprocess.Popen(command, cwd=cwd, env=env, stdout=out, stderr=subprocess.STDOUT)
        _, status, usage = os.wait4(process.pid, 0)
    wall = time.perf_counter() - started
    process.returncode = os.waitstatus_to_exitcode(status)
    if process.returncode != 0:
        tail = "".join(log.read_text(errors="replace").splitlines(keepends=True)[-40:])
        raise SystemExit(f"{' '.join(command)} failed ({process.returncode}):\n{tail}")
    return {
        "wall_s": wall,
        "cpu_s": usage.ru_utime + usage.ru_stime,
        "peak_rss_bytes": usage.ru_maxrss * 1024,
    }


def overrides(n_train: int, n_test: int, image_share: float) -> dict:
    return {
        "demo": {
            "n_train": n_train,
            "n_test": n_test,
            "image_size": IMAGE_SIZE,
            "long_text": True,
            "image_share": image_share,
            # every competition row has a link; a few are broken or corrupt, as in the demo
            "missing_image_rate": 0.0,
        }
    }


def run_size(n_train: int, n_test: int, image_share: float, workdir: Path) -> dict:
    """Build the project at one size and measure every stage; the entry stored in --out."""
    project = workdir / f"project_{n_train}"
    if project.exists():
        shutil.rmtree(project)
    copy_project(project, overrides(n_train, n_test, image_share))
    logs = project / "logs"
    logs.mkdir()
    print(f"\n== {n_train:,} train + {n_test:,} test rows in {project} (logs in {logs})")
    generate = measured(["pricefuse", "demo-data"], project, logs / "demo-data.log")
    print(f"  demo-data         {generate['wall_s']:8.1f} s (not part of the pipeline)")
    stages = {}
    for stage in STAGES:
        stages[stage] = measured(
            ["dvc", "repro", "--single-item", stage], project, logs / f"{stage}.log"
        )
        s = stages[stage]
        print(
            f"  {stage:<17} {s['wall_s']:8.1f} s  cpu {s['cpu_s']:8.1f} s  "
            f"peak {s['peak_rss_bytes'] / GIB:5.2f} GiB",
            flush=True,
        )
    status = run_cmd(["dvc", "status"], project).stdout.strip()
    embed = json.loads((project / "metrics" / "embed.json").read_text())
    ensemble = json.loads((project / "metrics" / "ensemble.json").read_text())
    return {
        "n_train": n_train,
        "n_test": n_test,
        "image_share": image_share,
        "commit": _git("rev-parse", "--short=10", "HEAD"),
        "dirty": bool(_git("status", "--porcelain", "--untracked-files=no")),
        "command": shlex.join(["python", "benchmarks/scale.py", *sys.argv[1:]]),
        "date": time.strftime("%Y-%m-%d"),
        "machine": machine(),
        "stages": stages,
        "dvc_status": status,
        "images": embed.get("rows_train", 0) * embed.get("image_coverage_train", 0)
        + embed.get("rows_test", 0) * embed.get("image_coverage_test", 0),
        "images_per_s": embed.get("images_per_s"),
        "texts_per_s": embed.get("texts_per_s"),
        "smape_oof": ensemble.get("smape_oof"),
    }


def exponent(t0: float, t1: float, n0: int, n1: int) -> float | None:
    if t0 <= 0 or t1 <= 0 or n0 == n1:
        return None
    return math.log(t1 / t0) / math.log(n1 / n0)


def size_table(entry: dict) -> dict:
    rows_total = entry["n_train"] + entry["n_test"]
    rows = []
    for stage, s in entry["stages"].items():
        rows.append(
            [
                stage,
                s["wall_s"],
                s["cpu_s"],
                s["peak_rss_bytes"] / GIB,
                rows_total / max(s["wall_s"], 1e-9),
            ]
        )
    total_wall = sum(s["wall_s"] for s in entry["stages"].values())
    total_cpu = sum(s["cpu_s"] for s in entry["stages"].values())
    peak = max(s["peak_rss_bytes"] for s in entry["stages"].values()) / GIB
    rows.append([WHOLE, total_wall, total_cpu, peak, rows_total / total_wall])
    return table(
        f"{entry['n_train']:,} train + {entry['n_test']:,} test rows, images on "
        f"{entry['image_share']:.0%} of rows: seconds and peak memory per stage "
        f"(commit {entry['commit']}, {entry['date']})",
        ["stage", "wall s", "CPU s", "peak RSS GiB", "rows/s"],
        rows,
        notes=(
            f"Ensemble OOF SMAPE {entry['smape_oof']:.2f} on the synthetic rows; "
            f"{entry['images']:.0f} images embedded at {entry['images_per_s'] or 0:.1f}/s, texts "
            f"at {entry['texts_per_s'] or 0:.0f}/s. Measured by `{entry['command']}`"
            f"{' (uncommitted changes)' if entry.get('dirty') else ''}; {entry['machine']}."
        ),
        formats=[None, ".1f", ".1f", ".2f", ",.0f"],
    )


def _seconds(entry: dict, stage: str, key: str) -> float:
    """A stage's seconds (`wall_s` or `cpu_s`), or the whole pipeline's for 'whole dvc repro'."""
    if stage == WHOLE:
        return sum(s[key] for s in entry["stages"].values())
    return entry["stages"][stage][key]


def _rows(entry: dict) -> int:
    return entry["n_train"] + entry["n_test"]


def growth_table(entries: list[dict]) -> dict | None:
    """Per stage and pair of consecutive sizes: the exponent k of wall time ~ rows^k, the same of
    CPU time, and the ratio of CPU seconds per row (the cost per row, which concurrent load on a
    shared machine changes far less than wall time)."""
    if len(entries) < 2:
        return None
    columns = ["stage"]
    pairs = list(itertools.pairwise(entries))
    for a, b in pairs:
        label = f"{a['n_train'] // 1000}k->{b['n_train'] // 1000}k"
        columns += [f"k wall {label}", f"k CPU {label}", f"CPU/row x {label}"]
    rows = []
    for stage in [*entries[-1]["stages"], WHOLE]:
        row: list = [stage]
        for a, b in pairs:
            na, nb = _rows(a), _rows(b)
            wa, wb = _seconds(a, stage, "wall_s"), _seconds(b, stage, "wall_s")
            ca, cb = _seconds(a, stage, "cpu_s"), _seconds(b, stage, "cpu_s")
            ratio = (cb / nb) / (ca / na) if ca > 0 else None
            row += [exponent(wa, wb, na, nb), exponent(ca, cb, na, nb), ratio]
        rows.append(row)
    return table(
        "Growth between sizes: time ~ rows^k (rows = train + test), and the ratio of CPU seconds "
        "per row",
        columns,
        rows,
        notes=(
            f"k = 1 is linear. A CPU cost per row growing by more than {GROWTH_LIMIT}x is flagged "
            "below the table. Every stage also pays a fixed start-up (Python, torch, MLflow: "
            "~10 s), which makes small sizes look dearer per row."
        ),
        formats=[None] + [".2f"] * (len(columns) - 1),
    )


def all_images_estimate(entry: dict) -> dict:
    """The measured time plus embedding (and fetching) an image for every remaining row."""
    rows_total = entry["n_train"] + entry["n_test"]
    per_image = 1.0 / entry["images_per_s"] if entry.get("images_per_s") else 0.0
    fetch = entry["stages"]["fetch_images"]["wall_s"] / max(entry["images"], 1.0)
    extra = (rows_total - entry["images"]) * (per_image + fetch)
    total = sum(s["wall_s"] for s in entry["stages"].values())
    return table(
        f"All images at {entry['n_train']:,} + {entry['n_test']:,} rows, estimated from the "
        "measured cost per image",
        ["images measured", "s per image (embed)", "s per image (fetch stage, local files)",
         "measured total s", "estimated total s, every row with an image"],
        [[entry["images"], per_image, fetch, total, total + extra]],
        notes=(
            "Network fetching is not measured (the images are local files); at the fetch "
            "stage's default concurrency it overlaps, and a cached image is never fetched again."
        ),
        formats=[",.0f", ".4f", ".4f", ",.0f", ",.0f"],
    )  # fmt: skip


def flags(entries: list[dict]) -> list[str]:
    out = []
    for entry in entries:
        for stage, s in entry["stages"].items():
            if s["peak_rss_bytes"] > RSS_CEILING:
                out.append(
                    f"{entry['n_train']:,}: {stage} peaked at "
                    f"{s['peak_rss_bytes'] / GIB:.1f} GiB (> 8 GiB)"
                )
    for a, b in itertools.pairwise(entries):
        for stage in b["stages"]:
            ca, cb = _seconds(a, stage, "cpu_s"), _seconds(b, stage, "cpu_s")
            ratio = (cb / _rows(b)) / (ca / _rows(a)) if ca > 0 else 0.0
            if ca > 5 and ratio > GROWTH_LIMIT:
                out.append(
                    f"{a['n_train']:,}->{b['n_train']:,}: {stage}'s CPU seconds per row grew "
                    f"{ratio:.2f}x"
                )
    return out


def print_table(t: dict) -> None:
    print(f"\n{t['title']}")
    widths = [max(len(str(c)), 12) for c in t["columns"]]
    print("  ".join(f"{c:>{w}}" for c, w in zip(t["columns"], widths, strict=True)))
    formats = t.get("formats") or [None] * len(t["columns"])
    for row in t["rows"]:
        cells = [
            "" if v is None else (format(v, f) if f and not isinstance(v, str) else str(v))
            for v, f in zip(row, formats, strict=True)
        ]
        print("  ".join(f"{c:>{w}}" for c, w in zip(cells, widths, strict=True)))
    if t.get("notes"):
        print(t["notes"])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", nargs="+", type=parse_size, default=[6000, 25000])
    parser.add_argument("--test-ratio", type=float, default=1.0, help="test rows per train row")
    parser.add_argument("--image-share", type=float, default=0.1)
    parser.add_argument("--workdir", type=Path, default=None, help="default: a temp dir")
    parser.add_argument("--keep", action="store_true", help="keep the project copies")
    parser.add_argument(
        "--out",
        type=Path,
        default=Path(tempfile.gettempdir()) / "pricefuse-scale.json",
        help="measurements accumulate here, one entry per size (default %(default)s)",
    )
    parser.add_argument("--report-only", action="store_true", help="print --out's tables")
    add_results_option(parser, "scale")
    args = parser.parse_args()

    entries = json.loads(args.out.read_text()) if args.out.is_file() else {}
    if not args.report_only:
        workdir = args.workdir or Path(tempfile.mkdtemp(prefix="pricefuse-scale-"))
        workdir.mkdir(parents=True, exist_ok=True)
        try:
            for n in args.sizes:
                entry = run_size(n, round(n * args.test_ratio), args.image_share, workdir)
                entries[str(n)] = entry
                args.out.write_text(json.dumps(entries, indent=1))
                if not args.keep:
                    shutil.rmtree(workdir / f"project_{n}", ignore_errors=True)
        finally:
            if not args.keep and args.workdir is None:
                shutil.rmtree(workdir, ignore_errors=True)
    ordered = [entries[k] for k in sorted(entries, key=int)]
    if not ordered:
        raise SystemExit(f"no measurements in {args.out}")
    tables = [size_table(e) for e in ordered]
    growth = growth_table(ordered)
    if growth:
        tables.append(growth)
    tables.append(all_images_estimate(ordered[-1]))
    for t in tables:
        print_table(t)
    for line in flags(ordered):
        print(f"FLAG {line}")
    print(f"\nmeasurements: {args.out}")
    if args.results:
        write_results(args.results, tables)


if __name__ == "__main__":
    main()
