"""The team's shared MLflow tracking server: a SQL database for runs and the registry, an
artifact store the server proxies, both reachable by every teammate through one URL.

Why a wrapper at all: the start-up has two steps that must not be forgotten or reordered —
`mlflow db upgrade` (the schema migrations a newer MLflow needs; the server refuses an
out-of-date schema) and then `mlflow server` with artifacts served through it, so clients
need only MLFLOW_TRACKING_URI, never the artifact store's credentials.
"""

from __future__ import annotations

import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class ServerConfig:
    """Where the server keeps what it records, and where it listens."""

    backend_store_uri: str  # SQLAlchemy URL, e.g. postgresql://mlflow:secret@db-host:5432/mlflow
    artifacts_destination: str  # a directory, or s3://bucket/prefix (boto3 credentials needed)
    host: str
    port: int
    workers: int | None  # uvicorn worker processes; None = MLflow's default
    # Host headers the server answers (DNS-rebinding guard); None = MLflow's default: localhost
    # and private addresses. Name the server's DNS name here when teammates use one.
    allowed_hosts: str | None


def _mlflow() -> list[str]:
    """MLflow's CLI in this interpreter (the same environment, whatever PATH says)."""
    return [sys.executable, "-m", "mlflow"]


def upgrade_command(config: ServerConfig) -> list[str]:
    return [*_mlflow(), "db", "upgrade", config.backend_store_uri]


def server_command(config: ServerConfig) -> list[str]:
    destination = config.artifacts_destination
    if "://" not in destination:  # a local directory: absolute, so the cwd does not matter
        destination = str(Path(destination).resolve())
    command = [
        *_mlflow(),
        "server",
        "--backend-store-uri",
        config.backend_store_uri,
        "--serve-artifacts",
        "--artifacts-destination",
        destination,
        "--host",
        config.host,
        "--port",
        str(config.port),
    ]
    if config.workers is not None:
        command += ["--workers", str(config.workers)]
    if config.allowed_hosts:
        command += ["--allowed-hosts", config.allowed_hosts]
    return command


def start(config: ServerConfig) -> None:
    """Migrate the database's schema, then become the server (exec: signals reach it).

    Raises subprocess.CalledProcessError when the migration fails (the database is unreachable
    or the URL wrong); the server is not started on a schema it cannot use.
    """
    subprocess.run(upgrade_command(config), check=True)
    command = server_command(config)
    sys.stdout.flush()
    sys.stderr.flush()
    os.execv(command[0], command)
