"""Stage `fetch_images`: every distinct image link of the raw CSVs -> validated image cache +
manifest in `data.images_dir` (pricefuse.data.images.update).

The cache directory is a persistent DVC output, so a re-run (or a run after `kill -9`) only
fetches what is not already valid there.
"""

from __future__ import annotations

from pricefuse.core.config import Params
from pricefuse.core.layout import Layout
from pricefuse.data.images.update import read_links, update_cache
from pricefuse.recording import tracking

STAGE = __name__.rpartition(".")[2]


def run(params: Params) -> None:
    layout = Layout(params.data)
    links = read_links([params.data.train_csv, params.data.test_csv])
    with tracking.stage_run(STAGE, params) as run:
        result = update_cache(links, layout.images_dir, params.fetch)
        tracking.record(run, STAGE, result)
