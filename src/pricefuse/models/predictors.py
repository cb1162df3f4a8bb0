"""Which class answers for each producer's model directory: the serving side of the registry.

Every persisted predictor has `load(directory)` and
`predict_members(batch: MemberBatch) -> {member: log1p predictions}`; a producer that
`feeds_features` also has `augment(batch) -> MemberBatch`, which adds its feature columns to the
parsed rows before the other producers predict (the neighbour features do this).

Why apart from `pricefuse.pipeline.members`: the "module:Class" strings below put every member's
code in the import closure of whoever imports this module, and dvc.yaml's code deps follow that
closure. Only the stages that load predictors (ensemble, ablation, submit) and the served model
import it, so editing a booster re-runs those and never the embedding.
"""

from __future__ import annotations

import importlib
from pathlib import Path
from typing import Any

PREDICTORS: dict[str, str] = {
    "neighbours": "pricefuse.models.neighbours.predictor:NeighbourIndex",
    "linear": "pricefuse.models.linear.predictor:LinearPredictor",
    "text": "pricefuse.models.text.predictor:TextPredictor",
    "fusion": "pricefuse.models.fusion.predictor:FusionPredictor",
    "gbdt": "pricefuse.models.gbdt.predictor:GbdtPredictor",
}


def predictor_class(producer: str) -> type:
    """The class that loads producer `producer`'s model directory (imported on demand)."""
    if producer not in PREDICTORS:
        raise KeyError(f"no predictor class for producer {producer!r}; known: {sorted(PREDICTORS)}")
    module_name, class_name = PREDICTORS[producer].split(":")
    return getattr(importlib.import_module(module_name), class_name)


def load_predictor(producer: str, directory: Path | str) -> Any:
    """Producer `producer`'s predictor, loaded from the model directory it wrote."""
    return predictor_class(producer).load(directory)
