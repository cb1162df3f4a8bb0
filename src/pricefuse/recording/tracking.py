"""MLflow conventions and output lineage, in one place.

Every stage run: experiment from params, run name = stage, tags `stage`, `git_commit`,
`git_dirty`, `data_md5`, `upstream.<dir>` run ids and where it computed (`device`, `gpu_name`,
`gpu_count`: pricefuse.core.device); params flattened with dotted keys. Every
output directory gets a `meta.json` naming the run that wrote it, which is how a downstream run
finds (and tags) the upstream runs it consumed.
"""

from __future__ import annotations

import hashlib
import importlib
import json
import logging
import os
import subprocess
import sys
from collections.abc import Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from pricefuse.core.config import Params, flatten
from pricefuse.core.device import device_tags, invisible_gpu_warning, resolve_device
from pricefuse.core.lineage import read_meta, write_meta
from pricefuse.core.records import StageRecord

METRICS_DIR = Path("metrics")
# Set by `pricefuse pipeline` under `mlflow run`: stage runs become children of that run.
PARENT_RUN_ENV = "PRICEFUSE_PARENT_RUN_ID"
SYSTEM_METRICS_INTERVAL_S = 2.0
SYSTEM_METRICS_PREFIX = "system/"  # MLflow's names for the sampled CPU / memory / GPU series
# Set by `pricefuse experiment` under `mlflow run`: only this stage joins that run.
JOIN_STAGE_ENV = "PRICEFUSE_JOIN_STAGE"


def default_tracking_uri(root: Path | None = None) -> str:
    """MLFLOW_TRACKING_URI when set, else sqlite:///<root>/mlflow.db (root = working dir)."""
    env = os.environ.get("MLFLOW_TRACKING_URI")
    if env:
        return env
    root = (root or Path.cwd()).resolve()
    return f"sqlite:///{root / 'mlflow.db'}"


def is_local_store(uri: str) -> bool:
    """Whether a tracking URI is a store on this machine (a SQLite file or a file store) rather
    than a tracking server or a shared database."""
    scheme = uri.split(":", 1)[0].lower() if ":" in uri else ""
    return scheme in ("", "file", "sqlite") or (len(scheme) == 1 and scheme.isalpha())


# Transport failures of the clients MLflow talks to its store through (HTTP to a server,
# SQLAlchemy to a database), by module and class name: importing them here would load both.
_TRANSPORT_MODULES = ("requests", "urllib3", "sqlalchemy")
_TRANSPORT = ("ConnectionError", "MaxRetryError", "NewConnectionError", "OperationalError")


def unreachable_store(exc: BaseException) -> str | None:
    """Why the tracking store could not be reached, if that is what `exc` (or an exception it
    was raised from or while handling) says; None for any other failure.

    Why: the MLflow client reports a dead server as `MlflowException("API request to <url>
    failed with exception ...")` after its retries, and a dead database as SQLAlchemy's
    OperationalError: both deserve one line naming the store, not a traceback.
    """
    from mlflow.exceptions import MlflowException

    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        text = str(current)
        if isinstance(current, MlflowException) and text.startswith("API request to "):
            return text.splitlines()[0][:400]
        kind = type(current)
        if kind.__module__.split(".")[0] in _TRANSPORT_MODULES and kind.__name__ in _TRANSPORT:
            return f"{kind.__name__}: {text.splitlines()[0][:400] if text else ''}"
        current = current.__cause__ or current.__context__
    return None


def unreachable_message(stage: str, uri: str, reason: str) -> str:
    """The one line a stage prints when its tracking store is gone."""
    store = "store" if is_local_store(uri) else "server"
    return (
        f"the MLflow tracking {store} (tracking URI {uri}) could not be reached while {stage} "
        f"ran: {reason}. The stage's outputs are not recorded, so DVC runs it again: start the "
        "tracking server again (docs/team.md) or point MLFLOW_TRACKING_URI at a "
        "running one, then re-run (`dvc repro`)."
    )


def configure(experiment: str, root: Path | None = None) -> str:
    """Point MLflow at the project store and experiment; returns the tracking URI."""
    import mlflow

    uri = default_tracking_uri(root)
    mlflow.set_tracking_uri(uri)
    if os.environ.get("MLFLOW_RUN_ID"):
        # Under `mlflow run` the run already exists in the experiment the user chose
        # (--experiment-name); joining it must not switch experiments.
        return uri
    if mlflow.get_experiment_by_name(experiment) is None:
        # A local store keeps artifacts beside it (<root>/mlruns); a tracking server decides
        # itself (its --artifacts-destination, served to every client): a path on this machine
        # would be unreadable from a teammate's.
        artifacts = None
        if is_local_store(uri):
            artifacts = ((root or Path.cwd()).resolve() / "mlruns").as_uri()
        try:
            mlflow.create_experiment(experiment, artifact_location=artifacts)
        except Exception:  # created concurrently by another process: fine
            if mlflow.get_experiment_by_name(experiment) is None:
                raise
    mlflow.set_experiment(experiment)
    return uri


def git_state(root: Path | None = None) -> tuple[str, bool]:
    """(commit sha or 'unknown', dirty?) of the working tree."""
    cwd = str(root or Path.cwd())
    try:
        sha = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=cwd, capture_output=True, text=True, check=True
        ).stdout.strip()
        status = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            cwd=cwd,
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
        return sha, bool(status)
    except (OSError, subprocess.CalledProcessError):
        return "unknown", False


def files_md5(paths: Iterable[Path | str]) -> str:
    """One md5 over the bytes of the given files (missing files hash as their name)."""
    digest = hashlib.md5()
    for path in paths:
        path = Path(path)
        digest.update(str(path.name).encode())
        if path.is_file():
            with path.open("rb") as handle:
                for chunk in iter(lambda: handle.read(1 << 20), b""):
                    digest.update(chunk)
    return digest.hexdigest()


def upstream_tags(dirs: Iterable[Path | str]) -> dict[str, str]:
    """`upstream.<stage>` -> run id for each upstream output directory that records one."""
    tags: dict[str, str] = {}
    for directory in dirs:
        meta = read_meta(directory)
        if meta.get("run_id"):
            tags[f"upstream.{meta.get('stage', Path(directory).name)}"] = str(meta["run_id"])
    return tags


def route_mlflow_run(stage: str) -> None:
    """Under `pricefuse experiment`, turn the `mlflow run` run into a parent for other stages.

    `dvc exp run <stage>` also re-runs stale upstream stages, each a separate process that
    inherits MLFLOW_RUN_ID. Joining them all would pile several stages' params and metrics into
    one run, so only the requested stage joins it; the others log child runs of it, as under
    `pricefuse pipeline`. Changes this process's environment, which is one stage's.
    """
    target = os.environ.get(JOIN_STAGE_ENV)
    run_id = os.environ.get("MLFLOW_RUN_ID")
    if target and run_id and target != stage:
        del os.environ["MLFLOW_RUN_ID"]
        os.environ[PARENT_RUN_ENV] = run_id


def log_flat_params(params: Params) -> None:
    """Every parameter under its dotted key on the active run (in batches MLflow accepts)."""
    import mlflow

    items = [(k, _truncate(v)) for k, v in flatten(params).items()]
    for start in range(0, len(items), 90):
        mlflow.log_params(dict(items[start : start + 90]))


def _truncate(value: Any) -> str:
    text = str(value)
    return text if len(text) <= 6000 else text[:5997] + "..."


def stage_device_tags(params: Params, device_key: str | None) -> dict[str, str]:
    """The device tags of a stage whose device setting is the dotted key `device_key` of
    `params` (e.g. `embed.device`; None: a stage that computes on the CPU only). When `auto`
    falls back to the CPU while nvidia-smi sees a GPU, prints pricefuse.core.device's one-line
    warning (stderr)."""
    if device_key is None:
        return device_tags("cpu")
    node: Any = params
    for part in device_key.split("."):
        node = getattr(node, part)
    device = str(node)
    resolved = resolve_device(device, device_key)
    if resolved == "cpu" and device.strip().lower() == "auto":
        warning = invisible_gpu_warning()
        if warning:
            print(warning, file=sys.stderr)
    return device_tags(resolved)


@contextmanager
def stage_run(
    stage: str, params: Params, inputs: Iterable[Path | str] = (), device_key: str | None = None
) -> Iterator[Any]:
    """Start (or join, under `mlflow run`) the MLflow run of one stage with the standard tags.

    `inputs`: the upstream outputs the stage reads; the raw CSVs are always added. Each is logged
    as an MLflow dataset with DVC's hash as digest (`pricefuse.recording.datasets`), and the ones
    that record a producing run (meta.json) become `upstream.<stage>` tags. `device_key`: the
    stage's device setting (`embed.device`, ...; None for a CPU-only stage); the run is tagged
    with the device it resolves to (`stage_device_tags`). System metrics (CPU, memory, GPU when
    present) are sampled for the run.
    """
    from pricefuse.core.errors import StageError

    uri = default_tracking_uri()
    tags = stage_device_tags(params, device_key)
    try:
        with _stage_run(stage, params, inputs, tags) as run:
            yield run
    except Exception as exc:
        reason = unreachable_store(exc)
        if reason is None:
            raise
        raise StageError(unreachable_message(stage, uri, reason)) from exc


@contextmanager
def _stage_run(
    stage: str, params: Params, inputs: Iterable[Path | str], extra_tags: Mapping[str, str]
) -> Iterator[Any]:
    import mlflow

    from pricefuse.recording.datasets import log_inputs

    route_mlflow_run(stage)
    configure(params.mlflow.experiment)
    # The sampler announces every start and stop at INFO: noise in each stage's output.
    logging.getLogger("mlflow.system_metrics").setLevel(logging.WARNING)
    if not os.environ.get("MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL"):
        # MLflow's 10 s default leaves most demo-sized stages without a single sample.
        mlflow.set_system_metrics_sampling_interval(SYSTEM_METRICS_INTERVAL_S)
    data_files = [Path(params.data.train_csv), Path(params.data.test_csv)]
    inputs = [Path(p) for p in inputs]
    sha, dirty = git_state()
    tags = {
        "stage": stage,
        "git_commit": sha,
        "git_dirty": str(dirty).lower(),
        "data_md5": files_md5(data_files),
        **upstream_tags(inputs),
        **extra_tags,
    }
    # Under `mlflow run` MLFLOW_RUN_ID is set and start_run() joins that run.
    parent = os.environ.get(PARENT_RUN_ENV)
    if parent:
        tags["mlflow.parentRunId"] = parent
    with mlflow.start_run(run_name=stage, log_system_metrics=True) as run:
        mlflow.set_tags(tags)
        if os.environ.get("MLFLOW_RUN_ID"):
            mlflow.set_tag("mlflow.runName", stage)
        log_flat_params(params)
        log_inputs([*data_files, *inputs])
        yield run
        write_metrics_file(stage, run.info.run_id)


@contextmanager
def stage_run_on_main(
    is_main: bool,
    stage: str,
    params: Params,
    inputs: Iterable[Path | str] = (),
    device_key: str | None = None,
) -> Iterator[Any]:
    """`stage_run` on the main process of a stage that several processes run together (data
    parallel training under torchrun / accelerate); None on the others. One stage, one run."""
    if not is_main:
        yield None
        return
    with stage_run(stage, params, inputs, device_key) as run:
        yield run


def record(run: Any, stage: str, result: StageRecord) -> None:
    """Log what a stage's core returned: metrics (and per-step series), tags, params, plots (CSV
    for DVC + PNG), tables, texts, meta.json in each output directory, artifacts, models in their
    MLflow flavor; print the summary."""
    import mlflow

    log_metrics(result.metrics)
    log_step_metrics(run.info.run_id, result.step_metrics)
    if result.tags:
        mlflow.set_tags(result.tags)
    if result.params:
        mlflow.log_params(result.params)
    for path in result.write_plots(stage):
        mlflow.log_artifact(str(path), "plots")
    for name, table in result.tables.items():
        mlflow.log_table(table, name)
    for name, text in result.texts.items():
        mlflow.log_text(text, name)
    # meta.json before the artifacts: an artifact may be (or contain) this run's meta.json.
    for out_dir, facts in result.meta.items():
        write_meta(out_dir, stage, run.info.run_id, **facts)
    for artifact_path, files in result.artifacts.items():
        for file in files:
            if Path(file).is_dir():
                mlflow.log_artifacts(str(file), artifact_path)
            else:
                mlflow.log_artifact(str(file), artifact_path)
    for name, logged in result.models.items():
        flavor = importlib.import_module(logged.flavor)
        flavor.log_model(logged.model, name=name, pip_requirements=logged.pip_requirements)
    print(result.summary)


# MLflow accepts at most 1000 metric values per log_batch call.
METRIC_BATCH = 1000


def log_step_metrics(run_id: str, series: Mapping[str, Sequence[float]]) -> None:
    """Per-step values (e.g. a learning curve per fold), batched: one call per 1000 values."""
    import time

    import mlflow
    from mlflow.entities import Metric

    now = int(time.time() * 1000)
    values = [
        Metric(name, float(value), now, step)
        for name, curve in series.items()
        for step, value in enumerate(curve, start=1)
    ]
    client = mlflow.MlflowClient()
    for start in range(0, len(values), METRIC_BATCH):
        client.log_batch(run_id, metrics=values[start : start + METRIC_BATCH])


def write_metrics_file(stage: str, run_id: str) -> Path:
    """Mirror the run's latest metrics to metrics/<stage>.json, which DVC tracks as metrics
    (so `dvc metrics diff` compares experiments without opening MLflow). System metrics (CPU,
    memory, disk samples) stay in MLflow: in the file they would differ on every run."""
    import mlflow

    metrics = mlflow.MlflowClient().get_run(run_id).data.metrics
    METRICS_DIR.mkdir(parents=True, exist_ok=True)
    path = METRICS_DIR / f"{stage}.json"
    payload = {
        key: round(float(value), 6)
        for key, value in sorted(metrics.items())
        if not key.startswith(SYSTEM_METRICS_PREFIX)
    }
    path.write_text(json.dumps(payload, indent=2) + "\n")
    return path


def log_metrics(metrics: dict[str, float], step: int | None = None) -> None:
    import mlflow

    clean = {k: float(v) for k, v in metrics.items() if v is not None}
    mlflow.log_metrics(clean, step=step)


def load_pyfunc(model_uri: str) -> Any:
    """A logged pyfunc model (the submit stage's `pyfunc` source runs the served model)."""
    import mlflow.pyfunc

    return mlflow.pyfunc.load_model(model_uri)
