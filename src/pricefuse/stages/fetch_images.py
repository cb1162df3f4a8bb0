"""Stage `fetch_images`: every distinct image link of the raw CSVs -> validated image cache +
manifest (`data.images_dir`), counts and throughput logged to MLflow.

The cache directory is a persistent DVC output, so a re-run (or a run after `kill -9`) only
fetches what is not already valid there.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import mlflow
import pandas as pd
from tqdm import tqdm

from pricefuse import tracking
from pricefuse.config import Params
from pricefuse.data.images import LinkRecord, distinct_links, fetch_images
from pricefuse.errors import StageError
from pricefuse.layout import Layout

STAGE = "fetch_images"
LINK_COLUMN = "image_link"


def read_links(csv_paths: list[str]) -> list[str]:
    """Distinct `image_link` values over the given CSVs, in first-seen order."""
    values: list[object] = []
    for path in csv_paths:
        if not Path(path).is_file():
            raise StageError(f"{path} not found (run `pricefuse demo-data` or set data.*_csv)")
        header = pd.read_csv(path, nrows=0).columns
        if LINK_COLUMN not in header:
            raise StageError(f"{path} has no {LINK_COLUMN!r} column (columns: {list(header)})")
        values.extend(pd.read_csv(path, usecols=[LINK_COLUMN], dtype=str)[LINK_COLUMN])
    links, _skipped = distinct_links(values)
    return links


def _progress(bar: tqdm) -> Callable[[LinkRecord], None]:
    """tqdm shows done and rate; the postfix counts links without an image by cause, updated
    only when one occurs (reformatting the bar for each of 150,000 images would cost more)."""
    problems = {"missing": 0, "bad": 0, "failed": 0}

    def update(record: LinkRecord) -> None:
        if record.status in problems:
            problems[record.status] += 1
            bar.set_postfix(problems, refresh=False)
        bar.update(1)

    return update


def run(params: Params) -> None:
    layout = Layout(params.data)
    links = read_links([params.data.train_csv, params.data.test_csv])
    with tracking.stage_run(STAGE, params) as run:
        with tqdm(total=len(links), desc=STAGE, unit="img", disable=None) as bar:
            result = fetch_images(links, layout.images_dir, params.fetch, progress=_progress(bar))
        metrics = result.as_metrics()
        tracking.log_metrics(metrics)
        mlflow.log_artifact(str(result.manifest), STAGE)
        tracking.write_meta(
            layout.images_dir,
            STAGE,
            run.info.run_id,
            counts=result.counts,
            links=len(result.records),
            bytes_fetched=result.bytes_fetched,
            seconds=round(result.seconds, 3),
            hosts_down=list(result.hosts_down),
        )
        counts = ", ".join(f"{status} {n}" for status, n in result.counts.items())
        tqdm.write(
            f"{STAGE}: {len(result.records)} links ({counts}) in {result.seconds:.1f}s, "
            f"{metrics['images_per_s']:.0f} images/s -> {result.manifest} (run {run.info.run_id})"
        )
