"""Time `dvc add` / `push` / `pull` of a fetch_images-shaped image cache: per file or per byte?

    python benchmarks/dvc_images.py                           # 1,000, 10,000 and 75,000 images
    python benchmarks/dvc_images.py --sizes 1000 10000        # quicker (~2 min on 2 cores)
    python benchmarks/dvc_images.py --shards 256 --jobs 4
    python benchmarks/dvc_images.py --results                 # also docs/results/dvc_images.json

For each size N it writes N distinct JPEGs the size of the fetch stage's (384 px longest side,
quality 85, ~15-35 KB: a few PIL images of smooth noise and shapes, each copy made distinct by a
JPEG comment segment, so writing 75,000 takes seconds) into `data/images/files/` of a temp
git+DVC repo, with the cache's `manifest.csv` and `cache.json`, and times, with a directory as
the remote (`--jobs` parallel transfers, DVC's default cache link type):

- `files`: the cache as the stage used to track it, one DVC object per image: `dvc add
  data/images`, `dvc push`, a second `dvc push` with nothing new, then, after deleting the DVC
  cache and the workspace copy, `dvc pull`;
- `shards`: the same images packed into `--shards` tar shards (pricefuse.core.image_shards,
  what the stage tracks now): the pack itself, the same four DVC steps on `data/images` with
  `files/` in .dvcignore, and the unpack a teammate's first stage runs after the pull.

Each DVC step is then fitted as seconds = a + b * files + c * MB over all runs (both layouts
give the fit different file counts for the same bytes), and the table says which share of the
`files` layout's time at the largest N is the per-file term. A local remote is the cheap case:
an S3 or SSH remote adds a round trip per object on top. Figures depend on the disk, the
machine and its load; not a test.
"""

from __future__ import annotations

import argparse
import io
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.results import add_results_option, table, write_results  # noqa: E402

from pricefuse.core.image_shards import pack, unpack  # noqa: E402
from pricefuse.data.images import LinkRecord, cache_stem, write_manifest  # noqa: E402
from tests.support import init_git_dvc  # noqa: E402

DVC_STEPS = ("add", "push", "push again", "pull")
LINK = "https://m.media-amazon.com/images/I/bench{:07d}.jpg"


def base_jpegs(count: int = 16, side: int = 384, seed: int = 0) -> list[bytes]:
    """`count` JPEGs of product-photo size: smooth colour fields, shapes, a little grain."""
    from PIL import Image, ImageDraw

    rng = np.random.default_rng(seed)
    out = []
    for sigma in np.linspace(0.5, 5.0, count):
        low = rng.integers(0, 256, (12, 12, 3), dtype=np.uint8)
        image = Image.fromarray(low).resize((side, side), Image.Resampling.BICUBIC)
        draw = ImageDraw.Draw(image)
        for _ in range(6):
            x0, y0 = (int(v) for v in rng.integers(0, side - 80, 2))
            x1, y1 = x0 + int(rng.integers(20, 120)), y0 + int(rng.integers(20, 120))
            draw.ellipse([x0, y0, x1, y1], fill=tuple(int(c) for c in rng.integers(0, 256, 3)))
        grain = rng.normal(0.0, sigma, (side, side, 3))
        pixels = np.clip(np.asarray(image, dtype=np.float64) + grain, 0, 255).astype(np.uint8)
        buffer = io.BytesIO()
        Image.fromarray(pixels).save(buffer, "JPEG", quality=85)
        out.append(buffer.getvalue())
    return out


def distinct_jpeg(base: bytes, index: int) -> bytes:
    """`base` with a COM segment after SOI naming `index`: a valid JPEG, unique bytes."""
    comment = f"pricefuse benchmark image {index:09d}".encode()
    segment = b"\xff\xfe" + (len(comment) + 2).to_bytes(2, "big") + comment
    return base[:2] + segment + base[2:]


def write_cache(images_dir: Path, n: int, bases: list[bytes]) -> tuple[list[str], int]:
    """A fetch cache of `n` images: files/, manifest.csv, cache.json. Returns names, bytes."""
    files = images_dir / "files"
    files.mkdir(parents=True)
    records, names, total = [], [], 0
    for i in range(n):
        link = LINK.format(i)
        data = distinct_jpeg(bases[i % len(bases)], i)
        name = cache_stem(link) + ".jpg"
        (files / name).write_bytes(data)
        records.append(LinkRecord(link, f"data/images/files/{name}", "ok", len(data), 1, ""))
        names.append(name)
        total += len(data)
    write_manifest(images_dir / "manifest.csv", records)
    (images_dir / "cache.json").write_text('{"format": 1, "max_side": 384}\n')
    return names, total


def sh(command: list[str], cwd: Path) -> float:
    started = time.perf_counter()
    result = subprocess.run(command, cwd=cwd, capture_output=True, text=True, timeout=7200)
    if result.returncode != 0:
        raise RuntimeError(f"{' '.join(command)} failed:\n{result.stdout}\n{result.stderr}")
    return time.perf_counter() - started


def init_repo(repo: Path, remote: Path, site_cache: Path, ignore_files: bool) -> None:
    repo.mkdir(parents=True)
    init_git_dvc(repo)
    for command in (
        ["dvc", "config", "core.site_cache_dir", str(site_cache)],
        ["dvc", "remote", "add", "-d", "bench", str(remote)],
    ):
        sh(command, repo)
    if ignore_files:
        with (repo / ".dvcignore").open("a") as handle:
            handle.write("/data/images/files/\n")


def dvc_steps(repo: Path, jobs: int) -> dict[str, float]:
    """add, push, push again, then delete the DVC cache and data/images (unpacked files too:
    a teammate's fresh clone) and pull."""
    seconds = {"add": sh(["dvc", "add", "data/images"], repo)}
    seconds["push"] = sh(["dvc", "push", "-j", str(jobs)], repo)
    seconds["push again"] = sh(["dvc", "push", "-j", str(jobs)], repo)
    shutil.rmtree(repo / ".dvc" / "cache")
    shutil.rmtree(repo / "data" / "images")
    seconds["pull"] = sh(["dvc", "pull", "-j", str(jobs)], repo)
    return seconds


def run_size(n: int, bases: list[bytes], shards: int, jobs: int, tmp: Path) -> list[dict]:
    """Both layouts at `n` images: one dict per layout with files, MB and each step's seconds."""
    work = tmp / f"n{n}"
    rows = []
    # files: one DVC object per image
    repo = work / "files"
    init_repo(repo, work / "remote-files", work / "site-files", ignore_files=False)
    names, total = write_cache(repo / "data" / "images", n, bases)
    seconds = dvc_steps(repo, jobs)
    rows.append({"layout": "files", "n": n, "files": n + 2, "mb": total / 1e6, **seconds})
    shutil.rmtree(work)
    # shards: the same images packed; DVC ignores files/
    repo = work / "shards"
    init_repo(repo, work / "remote-shards", work / "site-shards", ignore_files=True)
    images = repo / "data" / "images"
    names, total = write_cache(images, n, bases)
    started = time.perf_counter()
    packed = pack(images / "files", images / "shards", names, shards)
    seconds = {"pack": time.perf_counter() - started}
    shard_bytes = sum(p.stat().st_size for p in (images / "shards").iterdir())
    seconds.update(dvc_steps(repo, jobs))
    started = time.perf_counter()
    restored = unpack(images / "shards", images / "files")
    seconds["unpack"] = time.perf_counter() - started
    if restored.restored != n:
        raise RuntimeError(f"unpack restored {restored.restored} of {n} images")
    files = packed.written + 2
    rows.append({"layout": "shards", "n": n, "files": files, "mb": shard_bytes / 1e6, **seconds})
    shutil.rmtree(work)
    return rows


def fit(runs: list[dict], step: str) -> tuple[float, float, float]:
    """seconds = a + b * files + c * MB by least squares over the runs (a, b, c)."""
    x = np.array([[1.0, r["files"], r["mb"]] for r in runs])
    y = np.array([r[step] for r in runs])
    coef, *_ = np.linalg.lstsq(x, y, rcond=None)
    return float(coef[0]), float(coef[1]), float(coef[2])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[1000, 10000, 75000])
    parser.add_argument("--shards", type=int, default=256, help="tar shards (default 256)")
    parser.add_argument("--jobs", type=int, default=4, help="dvc push/pull -j (default 4)")
    parser.add_argument("--tmp", type=Path, default=None, help="where the temp repos go")
    add_results_option(parser, "dvc_images")
    args = parser.parse_args()
    if shutil.which("dvc") is None:
        parser.error("dvc is not on PATH (activate the project's virtual environment)")
    bases = base_jpegs()
    mean_kb = sum(len(b) for b in bases) / len(bases) / 1e3
    print(
        f"{len(bases)} base JPEGs, {min(map(len, bases)) / 1e3:.0f}-"
        f"{max(map(len, bases)) / 1e3:.0f} KB (mean {mean_kb:.1f} KB); dvc -j {args.jobs}"
    )
    runs: list[dict] = []
    with tempfile.TemporaryDirectory(prefix="dvc_images_", dir=args.tmp) as tmp:
        for n in args.sizes:
            for run in run_size(n, bases, args.shards, args.jobs, Path(tmp)):
                runs.append(run)
                steps = ", ".join(
                    f"{k} {run[k]:.1f}s" for k in ("pack", *DVC_STEPS, "unpack") if k in run
                )
                print(
                    f"{run['layout']:>6} N={n:,}: {run['files']:,} files, {run['mb']:.0f} MB: "
                    f"{steps}",
                    flush=True,
                )
    header = ["layout", "images", "DVC files", "MB", "step", "seconds", "files/s", "MB/s"]
    rows = []
    for run in runs:
        for step in ("pack", *DVC_STEPS, "unpack"):
            if step not in run:
                continue
            s = max(run[step], 1e-9)
            counted = run["n"] if step in ("pack", "unpack") else run["files"]
            rows.append(
                [
                    run["layout"],
                    run["n"],
                    run["files"],
                    run["mb"],
                    step,
                    run[step],
                    counted / s,
                    run["mb"] / s,
                ]
            )
    print()
    print(
        f"{'layout':>6} {'images':>7} {'DVC files':>9} {'MB':>7} {'step':>10} {'seconds':>8} "
        f"{'files/s':>9} {'MB/s':>7}"
    )
    for row in rows:
        print(
            f"{row[0]:>6} {row[1]:>7,} {row[2]:>9,} {row[3]:>7.0f} {row[4]:>10} {row[5]:>8.1f} "
            f"{row[6]:>9,.0f} {row[7]:>7.1f}"
        )
    largest = max(args.sizes)
    big = {r["layout"]: r for r in runs if r["n"] == largest}
    cost_rows = []
    print(f"\nfit seconds = a + b*files + c*MB over {len(runs)} runs; at N={largest:,}:")
    print(
        f"{'step':>10} {'a s':>7} {'b ms/file':>10} {'c s/MB':>8} {'per-file share':>15} "
        f"{'files s':>8} {'shards s':>9} {'speed-up':>9}"
    )
    for step in DVC_STEPS:
        a, b, c = fit(runs, step)
        files_run = big["files"]
        per_file = b * files_run["files"]
        share = per_file / max(a + per_file + c * files_run["mb"], 1e-9)
        speedup = files_run[step] / max(big["shards"][step], 1e-9)
        shards_total = big["shards"][step]
        cost_rows.append([step, a, b * 1e3, c, share, files_run[step], shards_total, speedup])
        print(
            f"{step:>10} {a:>7.2f} {b * 1e3:>10.3f} {c:>8.4f} {share:>15.0%} "
            f"{files_run[step]:>8.1f} {shards_total:>9.1f} {speedup:>8.1f}x"
        )
    if args.results:
        notes = (
            f"A directory as the remote, `dvc -j {args.jobs}`, DVC's default cache link type; "
            f"{args.shards} shards (pricefuse.core.image_shards). `push again`: nothing new. "
            "files/s: DVC files for the DVC steps, images for pack and unpack."
        )
        write_results(
            args.results,
            [
                table(
                    "DVC steps on the image cache, one file per image vs tar shards",
                    header,
                    rows,
                    notes=notes,
                    formats=[None, ",", ",", ".0f", None, ".1f", ",.0f", ".1f"],
                ),
                table(
                    f"Per-file vs per-byte cost (fit over all runs; shares at N={largest:,})",
                    [
                        "step",
                        "a (s)",
                        "b (ms/file)",
                        "c (s/MB)",
                        "per-file share",
                        "files (s)",
                        "shards (s)",
                        "speed-up",
                    ],
                    cost_rows,
                    formats=[None, ".2f", ".3f", ".4f", ".0%", ".1f", ".1f", ".1f"],
                ),
            ],
        )


if __name__ == "__main__":
    main()
