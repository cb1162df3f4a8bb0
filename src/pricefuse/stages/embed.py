"""Stage `embed`: parsed tables -> text/image embedding matrices (and the opt-in LLM text block,
when `embed.llm.model` is set) + `data.features_dir`/meta.json
with the row hash of each split (pricefuse.features.embedding), encoded in checkpointed chunks
under `data.checkpoints_dir`/embed, so a killed run resumes where it stopped. The image files are
restored from the cache's shards first where a `dvc pull` brought only those
(pricefuse.core.image_shards)."""

from __future__ import annotations

from pricefuse.core.config import Params
from pricefuse.core.image_shards import restore_image_files
from pricefuse.core.layout import Layout
from pricefuse.features.embedding import embed_tables, load_embed_inputs, load_encoders
from pricefuse.recording import tracking

STAGE = __name__.rpartition(".")[2]


def run(params: Params) -> None:
    layout = Layout(params.data)
    tables = load_embed_inputs(layout)
    restore_image_files(layout.images_dir)
    encoders = load_encoders(params.embed)
    with tracking.stage_run(STAGE, params, [layout.interim_dir], "embed.device") as run:
        result = embed_tables(tables, encoders, layout, params.embed)
        tracking.record(run, STAGE, result)
