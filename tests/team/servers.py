"""Real peers for the team test: a PostgreSQL cluster and the MLflow tracking server on it.

PostgreSQL refuses to run as root, so as root (CI, containers) the cluster is initialised and
run as the `postgres` user, in a directory that user owns; otherwise as the current user.
"""

from __future__ import annotations

import glob
import os
import shutil
import signal
import subprocess
import sys
import tempfile
from pathlib import Path

from tests.support import free_port, wait_for_url

DATABASE = "mlflow"
ROLE = "mlflow"


def postgres_bin() -> Path:
    """Debian's PostgreSQL binaries (newest version), which .ci/run installs when absent."""
    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"), key=_version)
    if not found:
        raise AssertionError(
            "PostgreSQL is not installed (no /usr/lib/postgresql/*/bin/initdb): "
            "apt-get install postgresql, as .ci/run does"
        )
    return Path(found[-1]).parent


def _version(path: str) -> int:
    return int(Path(path).parts[4]) if Path(path).parts[4].isdigit() else 0


class PostgresCluster:
    """A throw-away cluster on a free loopback port, with an `mlflow` role and database."""

    def __init__(self) -> None:
        self.bin = postgres_bin()
        self.as_root = os.geteuid() == 0
        self.dir = Path(tempfile.mkdtemp(prefix="pricefuse-pg-"))
        if self.as_root:
            shutil.chown(self.dir, "postgres", "postgres")
        self.port = free_port()
        self.url = f"postgresql://{ROLE}@127.0.0.1:{self.port}/{DATABASE}"

    def _run(self, tool: str, *args: str) -> None:
        prefix = ["runuser", "-u", "postgres", "--"] if self.as_root else []
        subprocess.run(
            [*prefix, str(self.bin / tool), *args],
            check=True,
            capture_output=True,
            text=True,
            cwd=self.dir,
        )

    def start(self) -> None:
        data = str(self.dir / "data")
        self._run("initdb", "-D", data, "-U", ROLE, "--auth=trust", "-E", "UTF8")
        options = f"-p {self.port} -k {self.dir} -c listen_addresses=127.0.0.1"
        self._run("pg_ctl", "-D", data, "-o", options, "-l", str(self.dir / "log"), "-w", "start")
        self._run("createdb", "-h", "127.0.0.1", "-p", str(self.port), "-U", ROLE, DATABASE)

    def stop(self) -> None:
        try:
            self._run("pg_ctl", "-D", str(self.dir / "data"), "-m", "immediate", "-w", "stop")
        finally:
            shutil.rmtree(self.dir, ignore_errors=True)


class TrackingServer:
    """`pricefuse tracking-server` (db upgrade + mlflow server) as its own process group, so
    stopping it takes its workers too, as a crash of the machine would."""

    def __init__(self, backend_store_uri: str, artifacts: Path, log: Path) -> None:
        self.backend_store_uri = backend_store_uri
        self.artifacts = artifacts
        self.log = log
        self.port = free_port()
        self.uri = f"http://127.0.0.1:{self.port}"
        self.process: subprocess.Popen | None = None

    def start(self) -> None:
        command = [
            str(Path(sys.executable).parent / "pricefuse"),
            "tracking-server",
            "--backend-store-uri",
            self.backend_store_uri,
            "--artifacts-destination",
            str(self.artifacts),
            "--port",
            str(self.port),
            "--workers",
            "1",
        ]
        with self.log.open("a") as log:
            self.process = subprocess.Popen(
                command, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
            )
        wait_for_url(f"{self.uri}/health", timeout=180, process=self.process)

    def kill(self) -> None:
        """SIGKILL the whole server (no graceful shutdown): what a crash looks like to clients."""
        if self.process is None or self.process.poll() is not None:
            return
        os.killpg(self.process.pid, signal.SIGKILL)
        self.process.wait(timeout=30)
