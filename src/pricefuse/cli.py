"""`pricefuse`: one subcommand per pipeline stage, plus demo-data, evaluate, compare and predict.

dvc.yaml and MLproject both call these commands, so a stage runs the same way whichever tool
started it. Stage modules are imported lazily: `pricefuse --help` stays instant.
"""

from __future__ import annotations

import importlib
import sys
from collections.abc import Callable
from pathlib import Path

import click

from pricefuse.core import compat
from pricefuse.core.config import ConfigError, Params, load_params
from pricefuse.core.errors import StageError
from pricefuse.stages import STAGES

compat.apply_env_defaults()


def _params_options(func: Callable) -> Callable:
    func = click.option(
        "--set",
        "overrides",
        multiple=True,
        metavar="KEY=VALUE",
        help="Override a parameter for this run only, e.g. --set fusion.lr=1e-3. "
        "An empty value keeps params.yaml's.",
    )(func)
    func = click.option(
        "--params",
        "params_path",
        type=click.Path(path_type=Path),
        default=Path("params.yaml"),
        show_default=True,
        help="Parameter file.",
    )(func)
    return func


def _load(params_path: Path, overrides: tuple[str, ...]) -> Params:
    try:
        return load_params(params_path, overrides)
    except ConfigError as exc:
        raise click.UsageError(str(exc)) from exc


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="pricefuse")
def main() -> None:
    """pricefuse: multimodal product price prediction pipeline."""


def _make_stage_command(stage: str) -> click.Command:
    module_name = f"pricefuse.stages.{stage}"

    @_params_options
    def command(params_path: Path, overrides: tuple[str, ...]) -> None:
        params = _load(params_path, overrides)
        from pricefuse.recording.experiments import direct_run_warning

        warning = direct_run_warning(stage, overrides, params_path=params_path)
        if warning:
            click.echo(warning, err=True)
        compat.apply()
        module = importlib.import_module(module_name)
        try:
            module.run(params)
        except StageError as exc:
            click.echo(f"error: {stage}: {exc}", err=True)
            sys.exit(1)

    command.__doc__ = f"Run the `{stage}` stage (docs/architecture.md, the stage contract)."
    return click.command(name=stage.replace("_", "-"))(command)


for _stage in STAGES:
    main.add_command(_make_stage_command(_stage))


@main.command("demo-data")
@_params_options
@click.option(
    "--out-dir", type=click.Path(path_type=Path), default=None, help="Default: demo.out_dir"
)
def demo_data(params_path: Path, overrides: tuple[str, ...], out_dir: Path | None) -> None:
    """Generate the deterministic synthetic demo dataset (CSV rows + rendered product images)."""
    params = _load(params_path, overrides)
    from pricefuse.data.demo import generate_demo

    summary = generate_demo(params.demo, seed=params.seed, out_dir=out_dir)
    click.echo(summary)


@main.command("pipeline")
@click.argument("dvc_args", nargs=-1, type=click.UNPROCESSED)
def pipeline(dvc_args: tuple[str, ...]) -> None:
    """Run `dvc repro` (the MLproject `main` entry point).

    Under `mlflow run` the stages become child runs of that run instead of all writing into it.
    """
    import os
    import subprocess

    from pricefuse.recording.tracking import PARENT_RUN_ENV

    env = dict(os.environ)
    parent = env.pop("MLFLOW_RUN_ID", None)
    if parent:
        env[PARENT_RUN_ENV] = parent
    sys.exit(subprocess.call(["dvc", "repro", *dvc_args], env=env))


@main.command("experiment")
@click.argument("stage")
@click.option(
    "--set",
    "overrides",
    multiple=True,
    metavar="KEY=VALUE",
    help="Parameter for the experiment, e.g. --set fusion.lr=1e-3 (written to params.yaml by "
    "`dvc exp run -S`). An empty value keeps params.yaml's.",
)
@click.option("--name", default=None, help="Experiment name (default: DVC picks one).")
def experiment(stage: str, overrides: tuple[str, ...], name: str | None) -> None:
    """Run one dvc.yaml stage with other parameters as a DVC experiment (`dvc exp run -S`).

    DVC records the parameters, the outputs and dvc.lock in an experiment (`dvc exp show`), so
    the next `dvc repro` keeps this output and re-runs what consumes it. Under `mlflow run` the
    stage logs into that run. MLproject's stage entry points call this.
    """
    from pricefuse.recording.experiments import run_experiment

    try:
        code = run_experiment(stage.replace("-", "_"), overrides, name=name)
    except ConfigError as exc:
        raise click.UsageError(str(exc)) from exc
    sys.exit(code)


@main.command("check-raw")
@click.argument("paths", nargs=-1, type=click.Path(path_type=Path))
def check_raw(paths: tuple[Path, ...]) -> None:
    """Check official train.csv/test.csv copies against their published size and sha256."""
    from pricefuse.data.official import check_official

    paths = paths or (Path("data/raw/train.csv"), Path("data/raw/test.csv"))
    problems = [p for p in (check_official(path) for path in paths) if p]
    for path in paths:
        if not any(str(path) in p for p in problems):
            click.echo(f"ok: {path} is the official {path.name}")
    for problem in problems:
        click.echo(f"error: {problem}", err=True)
    sys.exit(1 if problems else 0)


@main.command("evaluate")
@_params_options
def evaluate(params_path: Path, overrides: tuple[str, ...]) -> None:
    """Print the OOF SMAPE of every model and of the ensemble from the pipeline outputs."""
    params = _load(params_path, overrides)
    from pricefuse.analysis.reports import ablation_report, error_correlation_report, oof_report
    from pricefuse.models.ensemble.diversity import format_table

    click.echo(oof_report(params).to_string(index=False))
    correlation = error_correlation_report(params)
    if correlation is not None:
        click.echo("\ncorrelation of the members' OOF log errors (lower = they err differently):")
        click.echo(format_table(correlation))
    ablation = ablation_report()
    if ablation is not None:
        click.echo("\nablation (OOF SMAPE %, from metrics/ablation.json):")
        click.echo(ablation.to_string(index=False))


@main.command("compare")
@click.option(
    "--experiment", default=None, help="MLflow experiment. Default: mlflow.experiment of --params."
)
@click.option("--stage", default="train_fusion", show_default=True, help="Runs of this stage.")
@click.option(
    "--by",
    "by",
    multiple=True,
    default=("fusion.arch", "fusion.loss"),
    show_default=True,
    help="A param to group by (dotted key, repeat for several).",
)
@click.option("--metric", default="smape_oof", show_default=True)
@click.option(
    "--out",
    "out_dir",
    type=click.Path(file_okay=False, path_type=Path),
    default=Path("reports/compare"),
    show_default=True,
    help="Where compare.csv and compare.png go.",
)
@click.option(
    "--all-runs", is_flag=True, help="Also runs on other folds, each fold set a separate block."
)
@click.option(
    "--rank",
    type=click.Choice(["best", "mean"]),
    default="best",
    show_default=True,
    help="Order groups by their best run or by the mean over their runs (several seeds).",
)
@click.option(
    "--params",
    "params_path",
    type=click.Path(path_type=Path),
    default=Path("params.yaml"),
    show_default=True,
    help="Parameter file (the experiment name; its keys are valid --by params).",
)
def compare(
    experiment: str | None,
    stage: str,
    by: tuple[str, ...],
    metric: str,
    out_dir: Path,
    all_runs: bool,
    rank: str,
    params_path: Path,
) -> None:
    """One table and one plot of a metric per --by group over an experiment's runs of a stage.

    Only runs on the same folds are compared (pricefuse.recording.compare); logs nothing to MLflow.
    """
    from pricefuse.core.config import flatten
    from pricefuse.recording.compare import CompareError, compare_runs, load_runs, write_outputs
    from pricefuse.recording.tracking import default_tracking_uri

    params = _load(params_path, ())
    stage = stage.replace("-", "_")
    try:
        runs = load_runs(experiment or params.mlflow.experiment, stage, default_tracking_uri())
        known = list(flatten(params))
        result = compare_runs(runs, stage, by, metric, all_runs, known_params=known, rank=rank)
    except CompareError as exc:
        raise click.ClickException(str(exc)) from exc
    csv_path, png_path = write_outputs(result, out_dir)
    click.echo(result.to_text())
    click.echo(f"\nwrote {csv_path} and {png_path}")


@main.command("predict")
@click.option(
    "--model-uri",
    default=None,
    help="Default: models:/<registered_model>@<champion_alias> (the newest version if no "
    "version holds the alias yet)",
)
@click.option("--input", "input_csv", type=click.Path(exists=True, path_type=Path), required=True)
@click.option("--output", "output_csv", type=click.Path(path_type=Path), required=True)
@_params_options
def predict(
    model_uri: str | None,
    input_csv: Path,
    output_csv: Path,
    params_path: Path,
    overrides: tuple[str, ...],
) -> None:
    """Predict prices for a CSV of raw product rows with the registered ensemble.

    Image links are fetched as this command's params allow (`serving` and `fetch` of
    params.yaml and `--set`), not the model's snapshot: whoever runs it decides, e.g.
    `--set serving.allow_local_images=true` to read images from this disk.
    """
    params = _load(params_path, overrides)
    compat.apply()
    import mlflow
    import pandas as pd

    from pricefuse.data.images.guard import ImagePolicy
    from pricefuse.recording import tracking

    tracking.configure(params.mlflow.experiment)
    uri = model_uri
    if uri is None:
        from pricefuse.recording.registry import served_model_uri

        uri, note = served_model_uri(params.mlflow.registered_model, params.mlflow.champion_alias)
        if note:
            click.echo(f"note: {note}", err=True)
    model = mlflow.pyfunc.load_model(uri)
    served = model.unwrap_python_model()
    if hasattr(served, "image_policy"):  # duck-typed: the model's code is its own copy
        served.image_policy = ImagePolicy.from_config(params.serving, params.fetch)
    rows = pd.read_csv(input_csv)
    prices = model.predict(rows)
    prices.to_csv(output_csv, index=False)
    click.echo(f"wrote {len(prices)} predictions to {output_csv}")


@main.command("promote")
@click.option("--version", default=None, help="The version to gate. Default: the newest.")
@click.option(
    "--rows",
    "rows_csv",
    type=click.Path(exists=True, dir_okay=False, path_type=Path),
    default=None,
    help="A labelled CSV (catalog_content, image_link, price) never used for training: run both "
    "registered models on it. Default: compare the versions' out-of-fold predictions.",
)
@click.option("--force", is_flag=True, help="Move the alias even if the gate refuses (said so).")
@_params_options
def promote(
    version: str | None,
    rows_csv: Path | None,
    force: bool,
    params_path: Path,
    overrides: tuple[str, ...],
) -> None:
    """Give a registered version the champion alias if it is not worse than the holder.

    Compares SMAPE with mlflow.models.evaluate on the same rows; the tolerance is
    `mlflow.promotion_tolerance`. The decision is written on the version (tags, description).
    """
    params = _load(params_path, overrides)
    compat.apply()
    from pricefuse.recording.registry import PromotionError, promote_command

    try:
        decision = promote_command(params, version, rows_csv, force)
    except PromotionError as exc:
        raise click.ClickException(str(exc)) from exc
    click.echo(decision.describe())


@main.command("tracking-server")
@click.option(
    "--backend-store-uri",
    envvar="MLFLOW_BACKEND_STORE_URI",
    required=True,
    help="SQLAlchemy URL of the runs and registry database, "
    "e.g. postgresql://mlflow:secret@db-host:5432/mlflow (env MLFLOW_BACKEND_STORE_URI).",
)
@click.option(
    "--artifacts-destination",
    envvar="MLFLOW_ARTIFACTS_DESTINATION",
    default="mlartifacts",
    show_default=True,
    help="Directory or s3://bucket/prefix the server stores artifacts in and serves to clients.",
)
@click.option("--host", default="127.0.0.1", show_default=True, help="0.0.0.0 for the team.")
@click.option("--port", default=5000, show_default=True, type=int)
@click.option("--workers", default=None, type=int, help="Server processes (MLflow's default: 4).")
@click.option(
    "--allowed-hosts", default=None, help="Host headers to answer, e.g. mlflow.team.lan:5000."
)
def tracking_server(
    backend_store_uri: str,
    artifacts_destination: str,
    host: str,
    port: int,
    workers: int | None,
    allowed_hosts: str | None,
) -> None:
    """Upgrade the tracking database's schema, then run the team's MLflow tracking server.

    Teammates then set MLFLOW_TRACKING_URI=http://<host>:<port> (docs/team.md).
    """
    import subprocess

    from pricefuse.recording.server import ServerConfig, start

    config = ServerConfig(
        backend_store_uri, artifacts_destination, host, port, workers, allowed_hosts
    )
    try:
        start(config)
    except subprocess.CalledProcessError as exc:
        raise click.ClickException(
            f"`mlflow db upgrade` failed (exit {exc.returncode}) for the backend store "
            f"{backend_store_uri}: is the database running and the URL right? The server was "
            "not started."
        ) from exc


if __name__ == "__main__":
    main()
