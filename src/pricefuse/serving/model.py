"""The registered model: raw product rows in, prices out.

One pyfunc wraps the whole inference path the pipeline trained — parsing, text and image
encoders, the neighbour features, every member the registry (`pricefuse.pipeline.members`) names for
`ensemble.members`, and the blend or stacker — so `mlflow models serve` and `pricefuse predict`
answer exactly what `submit` wrote.
Rows without a usable image (no link, broken link, corrupt bytes) take the text-only path, as in
training, and say so: every answer row carries `image_used` and `image_status` (`ok`,
`no_image`, or why the image was refused or failed). Image links are fetched only as the
params snapshot's `serving` section allows (`pricefuse.data.images.guard`): requests come from
strangers. A row that cannot be priced at all (no catalog_content) is an error naming the row,
never a silent NaN. Each price comes with `price_low`/`price_high`, a split-conformal interval
(pricefuse.models.ensemble.intervals) at the request's `interval_level` (a signature param).
When the pipeline was trained with the LLM text block (`embed.llm.model` set), the model loads
that decoder once and computes the block for request rows as embed did (template, pooling, the
train rows' Standardiser, logged as the `llm` artifact); without it nothing LLM is imported.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import mlflow.pyfunc
import numpy as np
import pandas as pd

from pricefuse.serving.inputs import (
    INPUT_ID,
    INPUT_IMAGE_B64,
    INPUT_IMAGE_LINK,
    INPUT_TEXT,
    InvalidInputError,
    row_list,
    validate_input,
)

# Artifact keys inside the logged model (the producers' keys are their registry names).
ART_ENSEMBLE = "ensemble"
ART_PARAMS = "params"
ART_LLM = "llm"  # the LLM block's Standardiser arrays and llm.json (only when embed.llm is on)
PARAM_LEVEL = "interval_level"  # per-request param: the price interval's level


# The served model's requirements (`serving_requirements`), at the project root where stages run.
SERVE_REQUIREMENTS = "requirements-serve.txt"
# A decoder_lora text member needs these beyond requirements-serve.txt: its LoRA adapters load
# through peft, and transformers reads its GGUF backbone through gguf (models/text/decoder_lora).
DECODER_LORA_PACKAGES = ("peft", "gguf")
# The LLM text block (embed.llm) needs gguf beyond it: its default decoder is a GGUF file.
LLM_BLOCK_PACKAGES = ("gguf",)

# Requests of at most this many rows run torch on one thread. Why: their tensors are too small
# for intra-op parallelism to pay, and waking a second (PASSIVE-waiting) OpenMP thread for each
# of the ~150 ops of a row cost more than it saved: a single row's fusion heads took 14 ms on two
# threads, 8 ms on one, MiniLM 16 vs 15 ms (2-core machine). Larger requests keep torch's default.
ONE_THREAD_ROWS = 4


class PriceEnsembleModel(mlflow.pyfunc.PythonModel):
    """MLflow pyfunc: DataFrame of raw product rows -> DataFrame with `price` (and sample_id)."""

    llm_block: ServedLlmBlock | None = None  # the LLM text block's encoder, when trained with it

    def load_context(self, context: Any) -> None:
        self._load(context.artifacts, getattr(context, "model_config", None))

    def _load(self, artifacts: dict[str, str], model_config: dict | None = None) -> None:
        """Build the inference path from the artifacts. `model_config` (MLflow's serve-time
        SERVING_MODEL_CONFIG) may override the `serving.*` request limits, flat:
        `{"max_rows": 200}`. Inside MLflow's scoring server the limits are also installed
        around the server's request handling (pricefuse.serving.server_guard)."""
        from pricefuse.core import compat

        compat.apply()
        from pricefuse.core.config import params_from_dict
        from pricefuse.data.images.decode_pool import shared_pool
        from pricefuse.data.images.guard import ImagePolicy
        from pricefuse.features.image import ImageEncoder
        from pricefuse.features.text import TextEncoder
        from pricefuse.models.ensemble.blend import EnsembleState
        from pricefuse.models.ensemble.intervals import ConformalCalibration
        from pricefuse.models.predictors import load_predictor
        from pricefuse.pipeline.members import serving_producers
        from pricefuse.serving.limits import RequestLimits

        raw = json.loads(Path(artifacts[ART_PARAMS]).read_text())
        self.params = params_from_dict(raw)
        embed = self.params.embed
        self.text_encoder = TextEncoder.from_ref(
            embed.text_model, embed.text_max_length, embed.text_batch_size
        )
        self.image_encoder = ImageEncoder.from_ref(
            embed.image_model, embed.image_size, embed.image_batch_size
        )
        self.llm_block = (
            ServedLlmBlock(embed.llm, artifacts[ART_LLM]) if embed.llm.enabled else None
        )
        self.producers = [
            (producer, load_predictor(producer.name, artifacts[producer.name]))
            for producer in serving_producers(self.params)
        ]
        self.state = EnsembleState.load(artifacts[ART_ENSEMBLE])
        self.intervals = ConformalCalibration.load(artifacts[ART_ENSEMBLE])
        self.limits = RequestLimits.from_config(self.params.serving, model_config)
        self.image_policy = ImagePolicy.from_config(
            self.params.serving,
            self.params.fetch,
            max_fetches=self.limits.fetch_concurrency,
            max_fetches_per_host=self.limits.fetch_per_host,
        )
        # image decoding in killable processes shared by every request (started on first use)
        self.decoder = shared_pool(self.limits.decode_workers, self.limits.decode_seconds)
        from pricefuse.serving import server_guard

        if server_guard.in_scoring_server():
            server_guard.install(self.limits)

    def predict(
        self, context: Any, model_input: pd.DataFrame, params: dict | None = None
    ) -> pd.DataFrame:
        from mlflow.exceptions import MlflowException
        from mlflow.protos.databricks_pb2 import INTERNAL_ERROR, INVALID_PARAMETER_VALUE

        from pricefuse.models.ensemble.intervals import IntervalLevelError, check_level
        from pricefuse.serving.limits import CURRENT_REQUEST, Refusal

        request = CURRENT_REQUEST.get()  # set by the server guard; None in `pricefuse predict`
        try:
            try:
                if request is not None and hasattr(model_input, "__len__"):
                    request.limits.check_rows(len(model_input))
                rows = validate_input(model_input, self.limits.max_text_chars)
                level = check_level(
                    (params or {}).get(PARAM_LEVEL, self.params.serving.interval_level)
                )
            except (InvalidInputError, IntervalLevelError) as exc:
                raise MlflowException(str(exc), error_code=INVALID_PARAMETER_VALUE) from exc
            out = self._priced_in_chunks(rows, level, request)
        except Refusal as refusal:
            from pricefuse.serving.server_guard import RequestRefused

            raise RequestRefused(refusal) from None
        unpriced = np.flatnonzero(~np.isfinite(out["price"].to_numpy())).tolist()
        if unpriced:  # parsing bounds every feature, so this is a model fault, not the request's
            count, where = row_list(unpriced)
            raise MlflowException(
                f"the model produced no finite price for {count} {where}; please report these rows",
                error_code=INTERNAL_ERROR,
            )
        if INPUT_ID in rows.columns:
            out.insert(0, INPUT_ID, rows[INPUT_ID].to_numpy())
        return out

    def _priced_in_chunks(self, rows: pd.DataFrame, level: float, request: Any) -> pd.DataFrame:
        """Validated rows priced `serving.chunk_rows` at a time, with their image columns.

        Why chunks: a served request's deadline is checked before each chunk (and between the
        parts of one), so abandoned work stops within a chunk's time; and a chunk's decoded images
        are dropped once encoded, so a request holds at most one chunk of them. Inside a server
        request (`request` given) its images share one pixel budget; `pricefuse predict` (no
        request) has no deadline and no budget: its caller chose the input and waits for it.
        """
        from pricefuse.core.timings import Stopwatch
        from pricefuse.data.images.source import image_columns, load_images
        from pricefuse.serving.limits import PixelBudget

        deadline = request.deadline if request is not None else None
        budget = PixelBudget(self.limits.max_request_pixels) if request is not None else None
        watch = Stopwatch()
        parts = []
        for start in range(0, len(rows), self.limits.chunk_rows):
            chunk = rows.iloc[start : start + self.limits.chunk_rows].reset_index(drop=True)
            if deadline is not None:
                deadline.check(f"pricing rows {start} to {start + len(chunk) - 1}")
            with watch("image load"):
                outcomes = load_images(
                    chunk[INPUT_IMAGE_LINK],
                    chunk[INPUT_IMAGE_B64],
                    self.image_policy,
                    deadline=deadline.at if deadline is not None else None,
                    pixel_budget=budget,
                    decoder=self.decoder,
                )
            columns = image_columns(outcomes)
            images = [outcome.image for outcome in outcomes]
            del outcomes  # the images now live only in `images`, emptied once encoded
            priced = self.predict_prices(chunk, images, level, watch, deadline)
            parts.append(priced.assign(**columns))
        self.last_timings = watch.seconds
        return pd.concat(parts, ignore_index=True)

    def predict_prices(
        self,
        rows: pd.DataFrame,
        images: list[Any],
        level: float,
        watch: Any = None,
        deadline: Any = None,
    ) -> pd.DataFrame:
        """`price`, `price_low`, `price_high` (interval at `level`) for validated rows (see
        `validate_input`) and their images (None: text-only). `images` is emptied once the
        image encoder has read it, so the decoded images can be freed before the members run.
        `deadline` (a `pricefuse.serving.limits.Deadline`) is checked between the parts.

        The wall time of each part lands in `self.last_timings` (seconds by section: image load
        when `watch` comes from `predict`, parse, text encoder, image encoder,
        `member <producer>`, blend) for the latency benchmark; with concurrent calls it holds
        the last one to finish.
        """
        from pricefuse.core.timings import Stopwatch, torch_threads

        with torch_threads(1 if len(rows) <= ONE_THREAD_ROWS else None):
            return self._predict_prices(rows, images, level, watch or Stopwatch(), deadline)

    def _predict_prices(
        self, rows: pd.DataFrame, images: list[Any], level: float, watch: Any, deadline: Any
    ) -> pd.DataFrame:
        from pricefuse.data.text_clean import parse_products
        from pricefuse.models.ensemble.blend import meta_features, to_price
        from pricefuse.pipeline.members import MemberBatch

        def check(doing: str) -> None:
            if deadline is not None:
                deadline.check(doing)

        with watch("parse"):
            # the text options of the params snapshot: a request is cleaned as training was
            parsed, _report = parse_products(rows, self.params.preprocess)
        check("parsing")
        with watch("text encoder"):
            text_emb = self.text_encoder.encode(list(parsed["text"]))
        check("encoding the text")
        with watch("image encoder"):
            image_emb, mask = self.image_encoder.encode(images)
            images.clear()  # encoded: the decoded images are no longer needed
        check("encoding the images")
        llm = None
        if self.llm_block is not None:
            with watch("llm encoder"):
                llm = self.llm_block.encode(parsed)
            check("encoding the LLM block")
        parsed["has_image"] = mask
        batch = MemberBatch(parsed, text_emb, image_emb, mask, llm=llm)
        members = self.member_predictions(batch, watch)
        check("running the members")
        with watch("blend"):
            log_pred = self.state.predict_log(members, meta_features(parsed, mask))
            low, high = self.intervals.interval(log_pred, mask, level)
            out = pd.DataFrame({"price": to_price(log_pred), "price_low": low, "price_high": high})
        self.last_timings = watch.seconds
        return out

    def member_predictions(self, batch: Any, watch: Any = None) -> np.ndarray:
        """Member log predictions as columns, in the order the ensemble state expects.

        Feature providers (the neighbour index) run first and add their columns to the batch,
        and the predictions of the members a later producer stacks (`<producer>.stack_members`)
        join the batch as `member_<name>` columns — exactly the columns the training stages
        read (`pricefuse.pipeline.inputs.load_stage_rows` gives a consumer its own stacked
        members only). Members nobody stacks are not joined: each join copies the batch's
        table, which cost a served row more than some members' predictions. `watch` (a
        `pricefuse.core.timings.Stopwatch`) times each producer when given.
        """
        from pricefuse.core.timings import Stopwatch
        from pricefuse.pipeline.members import stack_members_of, stacked_column

        watch = watch or Stopwatch()
        by_name: dict[str, np.ndarray] = {}
        for position, (producer, predictor) in enumerate(self.producers):
            with watch(f"member {producer.name}"):
                if producer.feeds_features and self.params.neighbours.as_features:
                    batch = predictor.augment(batch)
                predicted = predictor.predict_members(batch)
                by_name.update(predicted)
                later = self.producers[position + 1 :]
                stacked = {m for p, _ in later for m in stack_members_of(self.params, p.name)}
                columns = {stacked_column(m): v for m, v in predicted.items() if m in stacked}
                if columns:
                    batch = batch.with_arrays(columns)
        return np.column_stack([by_name[name] for name in self.state.members])


class ServedLlmBlock:
    """The LLM text block for request rows, exactly as embed computed it for the train rows:
    `llm_texts` of the parsed rows, the configured layer and pooling of the decoder (loaded
    once, here), then the Standardiser fitted on the train rows (the `llm` artifact)."""

    def __init__(self, cfg: Any, directory: str | Path) -> None:
        from pricefuse.features.llm import LlmEncoder, Standardiser, Variant

        self.variant = Variant(cfg.layer, cfg.pooling)
        self.standardiser = Standardiser.load(Path(directory))
        self.encoder = LlmEncoder.from_ref(cfg.model, cfg.max_length, cfg.batch_size)

    def encode(self, parsed: pd.DataFrame) -> np.ndarray:
        from pricefuse.features.llm import llm_texts

        (raw,) = self.encoder.encode(llm_texts(parsed), [self.variant])
        return self.standardiser.transform(raw)


def model_signature(interval_level: float) -> Any:
    """Input: catalog_content (required); image_link, image_b64, sample_id (optional).
    Param: `interval_level`, defaulting to the argument (serving.interval_level, fixed at log time).

    Output: price, price_low, price_high, image_used and image_status (and the sample_id echoed
    when given).
    sample_id is declared `any` and checked by `validate_input`: MLflow's `long` enforcement
    truncates 1.5 to 1 without a word, so a client's bad id would come back as another id.
    """
    from mlflow.models import ModelSignature
    from mlflow.types import ColSpec, ParamSchema, ParamSpec, Schema
    from mlflow.types.schema import AnyType

    from pricefuse.models.ensemble.intervals import check_level

    inputs = Schema(
        [
            ColSpec("string", INPUT_TEXT),
            ColSpec("string", INPUT_IMAGE_LINK, required=False),
            ColSpec("string", INPUT_IMAGE_B64, required=False),
            ColSpec(AnyType(), INPUT_ID, required=False),
        ]
    )
    outputs = Schema(
        [
            ColSpec("double", "price"),
            ColSpec("double", "price_low"),
            ColSpec("double", "price_high"),
            ColSpec("boolean", "image_used"),
            ColSpec("string", "image_status"),
        ]
    )
    level = ParamSchema([ParamSpec(PARAM_LEVEL, "double", check_level(interval_level))])
    return ModelSignature(inputs=inputs, outputs=outputs, params=level)


def input_example(test_csv: str | Path, rows: int = 3) -> pd.DataFrame:
    """The first rows of the raw test CSV, in the request's columns: the model's input example.

    Read as text: rows without an image link must give "" (the signature's string), not pandas'
    float NaN, which MLflow refuses as an example (it did when the first test rows had no link).
    """
    raw = pd.read_csv(test_csv, nrows=rows, dtype=str, keep_default_na=False)
    return raw[[c for c in (INPUT_TEXT, INPUT_IMAGE_LINK) if c in raw.columns]]


def log_price_model(params: Any, layout: Any, test_rows: pd.DataFrame) -> dict[str, Any]:
    """Log the pyfunc (inside the active run) and register it when params say so.

    Artifacts are the trained members' directories and the params snapshot; encoders are
    referenced (`pkg:`/`hf:` refs resolve wherever the pinned requirements are installed), and the
    pricefuse source travels with the model as code so the model loads without this checkout.
    """
    import dataclasses
    import shutil
    import tempfile

    import pricefuse
    from pricefuse.pipeline.members import serving_producers
    from pricefuse.serving.limits import RequestLimits

    with tempfile.TemporaryDirectory() as tmp:
        params_path = Path(tmp) / "params.json"
        params_path.write_text(json.dumps(dataclasses.asdict(params), indent=2))
        artifacts = {p.name: str(layout.model_dir(p.name)) for p in serving_producers(params)}
        artifacts[ART_ENSEMBLE] = str(layout.model_dir("ensemble"))
        artifacts[ART_PARAMS] = str(params_path)
        if params.embed.llm.enabled:  # the train rows' Standardiser, for request rows
            block = Path(tmp) / ART_LLM
            block.mkdir()
            for path in layout.llm_block_files():
                if not path.is_file():
                    raise FileNotFoundError(
                        f"{path} not found: embed.llm.model is set but embed has not written "
                        "the LLM block (re-run embed)"
                    )
                shutil.copy2(path, block / path.name)
            artifacts[ART_LLM] = str(block)
        listed = Path(SERVE_REQUIREMENTS)
        requirements = None  # without the file (outside a project), MLflow infers them
        if listed.exists():
            requirements = serving_requirements(params, listed)
            constraints = Path(tmp) / "constraints.txt"
            constraints.write_text("\n".join(serving_constraints(requirements)) + "\n")
            requirements.append(f"-c {constraints}")  # MLflow logs it as constraints.txt
        registered = params.mlflow.registered_model if params.ensemble.register else None
        # the request limits as the model's config: MLflow lets a server override only the keys
        # a model was logged with (SERVING_MODEL_CONFIG='{"max_rows": 200}'; docs/serving.md)
        limits = dataclasses.asdict(RequestLimits.from_config(params.serving))
        info = mlflow.pyfunc.log_model(
            name="price_model",
            python_model=str(Path(__file__).with_name("entry.py")),
            artifacts=artifacts,
            code_paths=[str(Path(pricefuse.__file__).parent)],
            signature=model_signature(params.serving.interval_level),
            input_example=test_rows,
            pip_requirements=requirements,
            registered_model_name=registered,
            model_config=limits,
        )
    result: dict[str, Any] = {"model_uri": info.model_uri}
    if registered:
        result["registered_model"] = registered
        result["registered_version"] = info.registered_model_version
    return result


def serving_requirements(params: Any, listed: Path | str = SERVE_REQUIREMENTS) -> list[str]:
    """The served model's pip requirements: `listed` (requirements-serve.txt: what the serving
    code imports and the default encoders' weights, pinned as in requirements.lock without local
    labels), plus what this model needs beyond it, pinned at the installed version (local label
    dropped): the packages of the `pkg:` weights its encoders and text member reference, and
    peft and gguf when its text member is a decoder_lora, gguf (and the decoder's `pkg:`
    weights) when the LLM text block is on. Never the development tools of the lock; pricefuse
    itself ships with the model as code."""
    import importlib.metadata

    from packaging.requirements import Requirement
    from packaging.utils import canonicalize_name

    from pricefuse.core.sources import ref_distributions
    from pricefuse.pipeline.members import serving_producers

    lines = [line.split(" #", 1)[0].strip() for line in Path(listed).read_text().splitlines()]
    requirements = [line for line in lines if line and not line.startswith("#")]
    refs = [params.embed.text_model, params.embed.image_model]
    needed: dict[str, str] = {}
    if any(producer.name == "text" for producer in serving_producers(params)):
        refs.append(params.text.model)
        if params.text.kind == "decoder_lora":
            needed |= {name: importlib.metadata.version(name) for name in DECODER_LORA_PACKAGES}
    if params.embed.llm.enabled:
        refs.append(params.embed.llm.model)
        needed |= {name: importlib.metadata.version(name) for name in LLM_BLOCK_PACKAGES}
    for ref in refs:
        needed |= ref_distributions(ref)
    have = {canonicalize_name(Requirement(line).name) for line in requirements}
    for name, version in needed.items():
        if canonicalize_name(name) not in have:
            requirements.append(f"{name}=={version.split('+', 1)[0]}")
            have.add(canonicalize_name(name))
    return requirements


def serving_constraints(requirements: list[str]) -> list[str]:
    """`name==version` of every distribution `requirements` pull in here, themselves included,
    at the installed version (local label dropped): the model's constraints.txt. Its environment
    then gets the versions the model was built and tested with (requirements.lock's), where the
    requirements alone would let pip take the newest release every dependency allows.

    Walks the installed distributions' metadata (markers evaluated for this interpreter,
    requested extras followed); a constraint installs nothing by itself."""
    import importlib.metadata

    from packaging.requirements import Requirement
    from packaging.utils import canonicalize_name

    pins: dict[str, str] = {}
    todo = [Requirement(line) for line in requirements]
    seen: set[tuple[str, frozenset[str]]] = set()
    while todo:
        requirement = todo.pop()
        key = (canonicalize_name(requirement.name), frozenset(requirement.extras))
        if key in seen:
            continue
        seen.add(key)
        try:
            dist = importlib.metadata.distribution(requirement.name)
        except importlib.metadata.PackageNotFoundError:
            continue  # not installed here: nothing to pin it to
        pins[key[0]] = f"{dist.metadata['Name']}=={dist.version.split('+', 1)[0]}"
        for line in dist.requires or []:
            dependency = Requirement(line)
            extras = {"", *requirement.extras}
            marker = dependency.marker
            if marker is None or any(marker.evaluate({"extra": extra}) for extra in extras):
                todo.append(dependency)
    return sorted(pins.values(), key=str.lower)
