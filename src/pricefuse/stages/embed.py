"""Stage `embed`: parsed tables -> text/image embedding matrices + `data.features_dir`/meta.json
with the row hash of each split (pricefuse.features.embedding)."""

from __future__ import annotations

from pricefuse.core.config import Params
from pricefuse.core.layout import Layout
from pricefuse.features.embedding import embed_tables, load_embed_inputs, load_encoders
from pricefuse.recording import tracking

STAGE = __name__.rpartition(".")[2]


def run(params: Params) -> None:
    layout = Layout(params.data)
    tables = load_embed_inputs(layout)
    encoders = load_encoders(params.embed)
    with tracking.stage_run(STAGE, params, [layout.interim_dir], "embed.device") as run:
        result = embed_tables(tables, encoders, layout)
        tracking.record(run, STAGE, result)
