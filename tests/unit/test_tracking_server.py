"""The team's tracking server command, and what a stage says when its tracking store is gone.

The full picture (PostgreSQL, the server, two clones) is tests/team; here the parts that need
no database: the commands built, and a stage against a closed loopback port.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from click.testing import CliRunner

from pricefuse.cli import main
from pricefuse.core.errors import StageError
from pricefuse.recording import tracking
from pricefuse.recording.server import ServerConfig, server_command, upgrade_command
from tests.support import project_params
from tests.team.servers import free_port

DB = "postgresql://mlflow:secret@db.team.lan:5432/mlflow"


def test_server_command_serves_artifacts_from_an_absolute_destination(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    config = ServerConfig(DB, "mlartifacts", "0.0.0.0", 5000, None, None)
    command = server_command(config)
    assert command[command.index("--backend-store-uri") + 1] == DB
    assert "--serve-artifacts" in command
    assert command[command.index("--artifacts-destination") + 1] == str(tmp_path / "mlartifacts")
    assert command[command.index("--host") + 1] == "0.0.0.0"
    assert "--workers" not in command and "--allowed-hosts" not in command
    assert upgrade_command(config)[-3:] == ["db", "upgrade", DB]


def test_server_command_keeps_remote_destinations_and_passes_options():
    config = ServerConfig(DB, "s3://bucket/pricefuse", "0.0.0.0", 5001, 2, "mlflow.team.lan")
    command = server_command(config)
    assert command[command.index("--artifacts-destination") + 1] == "s3://bucket/pricefuse"
    assert command[command.index("--workers") + 1] == "2"
    assert command[command.index("--allowed-hosts") + 1] == "mlflow.team.lan"


def test_tracking_server_is_not_started_when_the_schema_upgrade_fails():
    # A URL SQLAlchemy rejects at once. (An unreachable database fails the same way, after
    # `mlflow db upgrade`'s ~100 s of connection retries: too slow for this tier.)
    url = "postgresql://mlflow@127.0.0.1:not-a-port/mlflow"
    result = CliRunner().invoke(main, ["tracking-server", "--backend-store-uri", url])
    assert result.exit_code == 1
    assert "`mlflow db upgrade` failed" in result.output and url in result.output


@pytest.mark.parametrize(
    ("uri", "local"),
    [
        ("sqlite:///tmp/mlflow.db", True),
        ("file:///tmp/mlruns", True),
        ("/tmp/mlruns", True),
        ("http://mlflow.team.lan:5000", False),
        ("https://mlflow.example.com", False),
        ("postgresql://mlflow@db:5432/mlflow", False),
    ],
)
def test_is_local_store(uri, local):
    assert tracking.is_local_store(uri) is local


def _stage_files(tmp_path: Path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    for name in ("train.csv", "test.csv"):
        (tmp_path / name).write_text("sample_id,catalog_content\n1,a\n")
    return project_params(data={"train_csv": "train.csv", "test_csv": "test.csv"})


def test_stage_against_a_dead_server_fails_with_one_clear_line(tmp_path, monkeypatch):
    params = _stage_files(tmp_path, monkeypatch)
    uri = f"http://127.0.0.1:{free_port()}"  # a closed port: the server is down
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    with (
        pytest.raises(StageError, match=r"the MLflow tracking server \(tracking URI") as caught,
        tracking.stage_run("demo_stage", params),
    ):
        pass
    message = str(caught.value)
    assert uri in message and "Connection refused" in message and "re-run" in message
    assert not (tmp_path / "metrics").exists()


def test_other_failures_in_a_stage_pass_through_unchanged(tmp_path, monkeypatch):
    params = _stage_files(tmp_path, monkeypatch)
    with pytest.raises(ValueError, match="not a tracking problem"):  # noqa: SIM117
        with tracking.stage_run("demo_stage", params):
            raise ValueError("not a tracking problem")
