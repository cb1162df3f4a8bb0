"""The registered model: raw product rows in, prices out.

One pyfunc wraps the whole inference path the pipeline trained — parsing, text and image
encoders, the neighbour features, every member the registry (`pricefuse.members`) names for
`ensemble.members`, and the blend or stacker — so `mlflow models serve` and `pricefuse predict`
answer exactly what `submit` wrote.
Rows without a usable image (no link, broken link, corrupt bytes) take the text-only path, as in
training. A row that cannot be priced at all (no catalog_content) is an error naming the row,
never a silent NaN.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import mlflow.pyfunc
import numpy as np
import pandas as pd

INPUT_TEXT = "catalog_content"
INPUT_IMAGE_LINK = "image_link"
INPUT_IMAGE_B64 = "image_b64"
INPUT_ID = "sample_id"

# Artifact keys inside the logged model (the producers' keys are their registry names).
ART_ENSEMBLE = "ensemble"
ART_PARAMS = "params"


# Requests of at most this many rows run torch on one thread. Why: their tensors are too small
# for intra-op parallelism to pay, and waking a second (PASSIVE-waiting) OpenMP thread for each
# of the ~150 ops of a row cost more than it saved: a single row's fusion heads took 14 ms on two
# threads, 8 ms on one, MiniLM 16 vs 15 ms (2-core machine). Larger requests keep torch's default.
ONE_THREAD_ROWS = 4


class InvalidInputError(ValueError):
    """Input rows the model cannot price; the message names the rows and the problem."""


def validate_input(frame: pd.DataFrame) -> pd.DataFrame:
    """Check the serving input and return a normalised copy (strings, no NaN in text)."""
    if not isinstance(frame, pd.DataFrame):
        raise InvalidInputError(f"expected a DataFrame of product rows, got {type(frame).__name__}")
    if INPUT_TEXT not in frame.columns:
        raise InvalidInputError(
            f"missing required column {INPUT_TEXT!r}; got columns {list(frame.columns)}"
        )
    if frame.empty:
        raise InvalidInputError("no rows to price")
    out = frame.reset_index(drop=True).copy()
    text = out[INPUT_TEXT]
    bad = [i for i, value in enumerate(text) if not isinstance(value, str) or not value.strip()]
    if bad:
        shown = ", ".join(str(i) for i in bad[:10])
        raise InvalidInputError(
            f"{len(bad)} row(s) have an empty or non-text {INPUT_TEXT!r} (row index {shown})"
        )
    for column in (INPUT_IMAGE_LINK, INPUT_IMAGE_B64):
        if column in out.columns:
            out[column] = [v if isinstance(v, str) and v.strip() else None for v in out[column]]
        else:
            out[column] = None
    return out


class PriceEnsembleModel(mlflow.pyfunc.PythonModel):
    """MLflow pyfunc: DataFrame of raw product rows -> DataFrame with `price` (and sample_id)."""

    def load_context(self, context: Any) -> None:
        self._load(context.artifacts)

    def _load(self, artifacts: dict[str, str]) -> None:
        from pricefuse import compat

        compat.apply()
        from pricefuse.config import params_from_dict
        from pricefuse.features.image import ImageEncoder
        from pricefuse.features.text import TextEncoder
        from pricefuse.members import serving_producers
        from pricefuse.models.ensemble import EnsembleState

        raw = json.loads(Path(artifacts[ART_PARAMS]).read_text())
        self.params = params_from_dict(raw)
        embed = self.params.embed
        self.text_encoder = TextEncoder.from_ref(
            embed.text_model, embed.text_max_length, embed.text_batch_size
        )
        self.image_encoder = ImageEncoder.from_ref(
            embed.image_model, embed.image_size, embed.image_batch_size
        )
        self.producers = [
            (producer, producer.load(artifacts[producer.name]))
            for producer in serving_producers(self.params)
        ]
        self.state = EnsembleState.load(artifacts[ART_ENSEMBLE])

    def predict(
        self, context: Any, model_input: pd.DataFrame, params: dict | None = None
    ) -> pd.DataFrame:
        from mlflow.exceptions import MlflowException
        from mlflow.protos.databricks_pb2 import INVALID_PARAMETER_VALUE

        try:
            rows = validate_input(model_input)
        except InvalidInputError as exc:
            raise MlflowException(str(exc), error_code=INVALID_PARAMETER_VALUE) from exc
        prices = self.predict_prices(rows)
        out = pd.DataFrame({"price": prices})
        if INPUT_ID in rows.columns:
            out.insert(0, INPUT_ID, rows[INPUT_ID].to_numpy())
        return out

    def predict_prices(self, rows: pd.DataFrame) -> np.ndarray:
        """Prices for validated rows (see `validate_input`).

        The wall time of each part lands in `self.last_timings` (seconds by section: parse,
        image load, text encoder, image encoder, `member <producer>`, blend) for the latency
        benchmark; with concurrent calls it holds the last one to finish.
        """
        from pricefuse.timings import Stopwatch, torch_threads

        with torch_threads(1 if len(rows) <= ONE_THREAD_ROWS else None):
            return self._predict_prices(rows, Stopwatch())

    def _predict_prices(self, rows: pd.DataFrame, watch: Any) -> np.ndarray:
        from pricefuse.data.catalog import parse_frame
        from pricefuse.data.images import load_image_source
        from pricefuse.members import MemberBatch
        from pricefuse.models.ensemble import meta_features, to_price

        with watch("parse"):
            parsed, _report = parse_frame(rows)
        with watch("image load"):
            images = [
                load_image_source(link=link, b64=b64, cfg=self.params.fetch)
                for link, b64 in zip(rows[INPUT_IMAGE_LINK], rows[INPUT_IMAGE_B64], strict=True)
            ]
        with watch("text encoder"):
            text_emb = self.text_encoder.encode(list(parsed["text"]))
        with watch("image encoder"):
            image_emb, mask = self.image_encoder.encode(images)
        parsed["has_image"] = mask
        batch = MemberBatch(parsed, text_emb, image_emb, mask)
        members = self.member_predictions(batch, watch)
        with watch("blend"):
            log_pred = self.state.predict_log(members, meta_features(parsed, mask))
            prices = to_price(log_pred)
        self.last_timings = watch.seconds
        return prices

    def member_predictions(self, batch: Any, watch: Any = None) -> np.ndarray:
        """Member log predictions as columns, in the order the ensemble state expects.

        Feature providers (the neighbour index) run first and add their columns to the batch,
        and every producer's predictions join the batch as `member_<name>` columns for the
        producers after it — exactly the columns the training stages read. `watch` (a
        `pricefuse.timings.Stopwatch`) times each producer when given.
        """
        from pricefuse.members import stacked_column
        from pricefuse.timings import Stopwatch

        watch = watch or Stopwatch()
        by_name: dict[str, np.ndarray] = {}
        for producer, predictor in self.producers:
            with watch(f"member {producer.name}"):
                if producer.feeds_features and self.params.neighbours.as_features:
                    batch = predictor.augment(batch)
                predicted = predictor.predict_members(batch)
                by_name.update(predicted)
                # later producers may take these as stacked features (gbdt.stack_members)
                batch = batch.with_columns(
                    pd.DataFrame({stacked_column(m): v for m, v in predicted.items()})
                )
        return np.column_stack([by_name[name] for name in self.state.members])


def model_signature() -> Any:
    """Input: catalog_content (required); image_link, image_b64, sample_id (optional).

    Output: price (and the sample_id echoed when given).
    """
    from mlflow.models import ModelSignature
    from mlflow.types import ColSpec, Schema

    inputs = Schema(
        [
            ColSpec("string", INPUT_TEXT),
            ColSpec("string", INPUT_IMAGE_LINK, required=False),
            ColSpec("string", INPUT_IMAGE_B64, required=False),
            ColSpec("long", INPUT_ID, required=False),
        ]
    )
    outputs = Schema([ColSpec("double", "price")])
    return ModelSignature(inputs=inputs, outputs=outputs)


def input_example(test_csv: str | Path, rows: int = 3) -> pd.DataFrame:
    """The first rows of the raw test CSV, in the request's columns: the model's input example."""
    raw = pd.read_csv(test_csv, nrows=rows)
    return raw[[c for c in (INPUT_TEXT, INPUT_IMAGE_LINK) if c in raw.columns]]


def log_price_model(params: Any, layout: Any, test_rows: pd.DataFrame) -> dict[str, Any]:
    """Log the pyfunc (inside the active run) and register it when params say so.

    Artifacts are the trained members' directories and the params snapshot; encoders are
    referenced (`pkg:`/`hf:` refs resolve wherever the pinned requirements are installed), and the
    pricefuse source travels with the model as code so the model loads without this checkout.
    """
    import dataclasses
    import tempfile

    import pricefuse
    from pricefuse.members import serving_producers

    with tempfile.TemporaryDirectory() as tmp:
        params_path = Path(tmp) / "params.json"
        params_path.write_text(json.dumps(dataclasses.asdict(params), indent=2))
        artifacts = {p.name: str(layout.model_dir(p.name)) for p in serving_producers(params)}
        artifacts[ART_ENSEMBLE] = str(layout.model_dir("ensemble"))
        artifacts[ART_PARAMS] = str(params_path)
        lock = Path("requirements.lock")
        registered = params.mlflow.registered_model if params.ensemble.register else None
        info = mlflow.pyfunc.log_model(
            name="price_model",
            python_model=str(Path(pricefuse.__file__).parent / "pyfunc_entry.py"),
            artifacts=artifacts,
            code_paths=[str(Path(pricefuse.__file__).parent)],
            signature=model_signature(),
            input_example=test_rows,
            pip_requirements=_requirements(lock) if lock.exists() else None,
            registered_model_name=registered,
        )
    result: dict[str, Any] = {"model_uri": info.model_uri}
    if registered:
        result["registered_model"] = registered
        result["registered_version"] = info.registered_model_version
    return result


def _requirements(lock: Path) -> list[str]:
    """The pinned lock minus comments and local/editable entries (pricefuse ships as code)."""
    lines = []
    for line in lock.read_text().splitlines():
        line = line.strip()
        if not line or line.startswith(("#", "-e", "--")) or "pricefuse" in line:
            continue
        lines.append(line)
    return lines
