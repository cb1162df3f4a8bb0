"""Stage `preprocess`: raw CSVs + image manifest -> `data.interim_dir`/{train,test}.parquet with
group folds (pricefuse.data.preprocess). The image files are restored from the cache's shards
first where a `dvc pull` brought only those (pricefuse.core.image_shards)."""

from __future__ import annotations

from pricefuse.core.config import Params
from pricefuse.core.image_shards import restore_image_files
from pricefuse.core.layout import Layout
from pricefuse.data.preprocess import check_n_folds, preprocess
from pricefuse.data.raw import read_raw_splits
from pricefuse.recording import tracking

STAGE = __name__.rpartition(".")[2]


def run(params: Params) -> None:
    layout = Layout(params.data)
    raw = read_raw_splits(params.data)
    check_n_folds(params.preprocess.n_folds, len(raw["train"]))
    restore_image_files(layout.images_dir)
    with tracking.stage_run(STAGE, params, inputs=[layout.images_dir]) as run:
        result = preprocess(raw["train"], raw["test"], params.preprocess, params.seed, layout)
        tracking.record(run, STAGE, result)
