"""The `fetch_images` stage's work: the distinct image links of the raw CSVs, one fetch run into
the cache with a progress bar, and what the stage records.

Not re-exported by the package (it imports the plotting stack through `pricefuse.core.records`,
which
serving has no use for). `update_cache` never calls MLflow.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path

import pandas as pd
from tqdm import tqdm

from pricefuse.core.config import FetchConfig
from pricefuse.core.errors import StageError
from pricefuse.core.records import StageRecord
from pricefuse.data.images.fetch import fetch_images
from pricefuse.data.images.links import distinct_links
from pricefuse.data.images.records import LinkRecord

LINK_COLUMN = "image_link"
# MLflow artifact path of the manifest (the stage's name, as before the stage became glue).
MANIFEST_ARTIFACT = "fetch_images"


def read_links(csv_paths: Sequence[str | Path]) -> list[str]:
    """Distinct `image_link` values over the given CSVs, in first-seen order (only that column is
    read: the full train CSV is mostly catalog text the fetch does not need)."""
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


def update_cache(links: Sequence[str], images_dir: Path, cfg: FetchConfig) -> StageRecord:
    """Fetch what the cache at `images_dir` lacks (valid files are kept, so a re-run resumes) and
    return the counts, throughput and manifest as what the stage records."""
    with tqdm(total=len(links), desc="fetch_images", unit="img", disable=None) as bar:
        result = fetch_images(links, images_dir, cfg, progress=_progress(bar))
    metrics = result.as_metrics()
    counts = ", ".join(f"{status} {n}" for status, n in result.counts.items())
    return StageRecord(
        summary=(
            f"fetch_images: {len(result.records)} links ({counts}) in {result.seconds:.1f}s, "
            f"{metrics['images_per_s']:.0f} images/s -> {result.manifest}"
        ),
        metrics=metrics,
        artifacts={MANIFEST_ARTIFACT: [result.manifest]},
        meta={
            Path(images_dir): {
                "counts": result.counts,
                "links": len(result.records),
                "bytes_fetched": result.bytes_fetched,
                "seconds": round(result.seconds, 3),
                "hosts_down": list(result.hosts_down),
            }
        },
    )
