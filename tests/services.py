"""Real services for tests: a throwaway PostgreSQL 15 laid out like the compose stack, and a
real `mlflow server` on it with proxied artifacts.

Everything listens on loopback, on free ports, inside a temporary directory; every process is
stopped by its own pid (or its own process group) when the session ends, also after a failure.
The fixtures are session-scoped so that later tests (the flows against a real registry) reuse
one server: `mlflow_tracking_uri` is the entry point; `stack_databases` gives the Prefect and
MLflow database URLs.
"""

from __future__ import annotations

import os
import pwd
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import pytest

PG_BIN = Path("/usr/lib/postgresql/15/bin")
INIT_DATABASES_SCRIPT = Path(__file__).resolve().parents[1] / "docker" / "postgres" / "init-databases.sh"
# initdb and postgres refuse to run as root; as root the tests run them as this account.
POSTGRES_ACCOUNT = "postgres"
STARTUP_TIMEOUT_S = 90.0
STOP_TIMEOUT_S = 5.0  # then SIGKILL: the data dies with the temp dir anyway


@dataclass(frozen=True)
class PostgresServer:
    port: int
    socket_dir: Path  # superuser sessions go through the socket (trust); TCP needs a password

    def url(self, user: str, password: str, database: str, driver: str = "psycopg2") -> str:
        return f"postgresql+{driver}://{user}:{password}@127.0.0.1:{self.port}/{database}"


@dataclass(frozen=True)
class StackDatabases:
    """The databases docker/postgres/init-databases.sh creates, with their roles' passwords."""

    server: PostgresServer
    prefect_password: str
    mlflow_password: str

    @property
    def prefect_url(self) -> str:  # what PREFECT_API_DATABASE_CONNECTION_URL holds in the stack
        return self.server.url("prefect", self.prefect_password, "prefect", driver="asyncpg")

    @property
    def mlflow_url(self) -> str:  # what MLFLOW_BACKEND_STORE_URI holds in the stack
        return self.server.url("mlflow", self.mlflow_password, "mlflow")


@dataclass(frozen=True)
class MlflowServer:
    tracking_uri: str
    artifacts_dir: Path  # the --artifacts-destination the server proxies to


def postgres_missing_reason() -> str | None:
    """Why a real PostgreSQL cannot start here, or None when it can."""
    missing = [name for name in ("initdb", "postgres", "pg_isready", "psql") if not (PG_BIN / name).is_file()]
    if missing:
        return f"PostgreSQL 15 binaries {missing} not under {PG_BIN} (apt-get install postgresql-15)"
    if os.geteuid() == 0:
        try:
            pwd.getpwnam(POSTGRES_ACCOUNT)
        except KeyError:
            return f"running as root and there is no {POSTGRES_ACCOUNT!r} account to run PostgreSQL as"
    return None


def free_loopback_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _as_postgres_account() -> dict:
    """Popen arguments that drop root to the postgres account (initdb refuses root)."""
    if os.geteuid() != 0:
        return {}
    return {"user": POSTGRES_ACCOUNT, "group": POSTGRES_ACCOUNT, "extra_groups": []}


def _wait_until(ready: Callable[[], bool], process: subprocess.Popen, log: Path, what: str) -> None:
    deadline = time.monotonic() + STARTUP_TIMEOUT_S
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"{what} exited with {process.returncode}:\n{log.read_text()[-4000:]}")
        if ready():
            return
        time.sleep(0.25)
    raise TimeoutError(f"{what} not ready after {STARTUP_TIMEOUT_S:.0f} s:\n{log.read_text()[-4000:]}")


def _stop(process: subprocess.Popen, stop_signal: int, whole_group: bool = False) -> None:
    """Stop one process we started (and, if asked, the process group it leads) by its id."""
    if process.poll() is None:
        send = os.killpg if whole_group else os.kill
        send(process.pid, stop_signal)
        try:
            process.wait(timeout=STOP_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            send(process.pid, signal.SIGKILL)
            process.wait()
    elif whole_group:  # the leader is gone; sweep up workers it may have left in its group
        try:
            os.killpg(process.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


@contextmanager
def running_postgres(workdir: Path) -> Iterator[PostgresServer]:
    """A fresh PostgreSQL cluster: socket sessions trusted, TCP (loopback only) by scram password."""
    workdir.mkdir(parents=True, exist_ok=True)
    if os.geteuid() == 0:
        shutil.chown(workdir, POSTGRES_ACCOUNT, POSTGRES_ACCOUNT)
    data_dir, log = workdir / "data", workdir / "postgres.log"
    subprocess.run(
        [
            PG_BIN / "initdb",
            "-D",
            data_dir,
            "-U",
            "postgres",
            "--auth-local=trust",
            "--auth-host=scram-sha-256",
            "--encoding=UTF8",
            "--no-sync",
        ],
        check=True,
        capture_output=True,
        **_as_postgres_account(),
    )
    server = PostgresServer(port=free_loopback_port(), socket_dir=workdir)
    with log.open("wb") as log_file:
        process = subprocess.Popen(
            [
                PG_BIN / "postgres",
                "-D",
                data_dir,
                "-p",
                str(server.port),
                "-k",
                workdir,
                "-c",
                "listen_addresses=127.0.0.1",
                "-c",
                "fsync=off",
            ],
            stdout=log_file,
            stderr=subprocess.STDOUT,
            **_as_postgres_account(),
        )
    try:
        _wait_until(lambda: _accepts_sessions(server), process, log, "PostgreSQL")
        yield server
    finally:
        _stop(process, signal.SIGINT)  # SIGINT: PostgreSQL's fast shutdown


def _accepts_sessions(server: PostgresServer) -> bool:
    ready = subprocess.run([PG_BIN / "pg_isready", "-q", "-h", server.socket_dir, "-p", str(server.port)], check=False)
    return ready.returncode == 0


def create_stack_databases(server: PostgresServer, prefect_password: str, mlflow_password: str) -> StackDatabases:
    """Run the compose stack's own init script, with the environment the postgres image gives it."""
    env = {
        **os.environ,
        "PATH": f"{PG_BIN}:{os.environ['PATH']}",
        "PGHOST": str(server.socket_dir),
        "PGPORT": str(server.port),
        "POSTGRES_USER": "postgres",
        "POSTGRES_DB": "postgres",
        "PREFECT_DB_PASSWORD": prefect_password,
        "MLFLOW_DB_PASSWORD": mlflow_password,
    }
    subprocess.run(["bash", INIT_DATABASES_SCRIPT], env=env, check=True, capture_output=True)
    return StackDatabases(server, prefect_password, mlflow_password)


@contextmanager
def running_mlflow_server(
    backend_store_uri: str, workdir: Path, allowed_hosts: str = "localhost:*,127.0.0.1:*", port: int | None = None
) -> Iterator[MlflowServer]:
    """`mlflow server` on a loopback port (default: a free one), proxying artifacts to a local directory.

    Pass the port of a stopped server, with its workdir, to bring that server back.
    """
    workdir.mkdir(parents=True, exist_ok=True)
    artifacts_dir, log = workdir / "artifacts", workdir / "mlflow-server.log"
    port = port or free_loopback_port()
    server = MlflowServer(tracking_uri=f"http://127.0.0.1:{port}", artifacts_dir=artifacts_dir)
    mlflow_cli = Path(sys.executable).with_name("mlflow")
    with log.open("wb") as log_file:
        process = subprocess.Popen(
            [
                mlflow_cli,
                "server",
                "--host",
                "127.0.0.1",
                "--port",
                str(port),
                "--workers",
                "1",
                "--backend-store-uri",
                backend_store_uri,
                "--serve-artifacts",
                "--artifacts-destination",
                artifacts_dir,
                "--allowed-hosts",
                allowed_hosts,
            ],
            stdout=log_file,
            stderr=subprocess.STDOUT,
            cwd=workdir,
            # Server-side jobs (GenAI scorers) are not used by layermoe; without them it starts faster.
            env={**os.environ, "MLFLOW_DISABLE_TELEMETRY": "true", "DO_NOT_TRACK": "true", "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"},
            start_new_session=True,  # its own process group: the web workers stop with it
        )
    try:
        _wait_until(lambda: _responds(f"{server.tracking_uri}/health"), process, log, "mlflow server")
        yield server
    finally:
        _stop(process, signal.SIGTERM, whole_group=True)


def _responds(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=2) as response:
            return response.status == 200
    except (urllib.error.URLError, ConnectionError, TimeoutError):
        return False


@pytest.fixture(scope="session")
def stack_databases() -> Iterator[StackDatabases]:
    """A real PostgreSQL 15 with the stack's `prefect` and `mlflow` databases."""
    if reason := postgres_missing_reason():
        pytest.skip(reason)
    workdir = Path(tempfile.mkdtemp(prefix="layermoe-postgres-"))
    try:
        with running_postgres(workdir) as server:
            yield create_stack_databases(server, "prefect-test-pw", "mlflow-test-pw")
    finally:
        shutil.rmtree(workdir, ignore_errors=True)


@pytest.fixture(scope="session")
def mlflow_server(stack_databases: StackDatabases) -> Iterator[MlflowServer]:
    """A real `mlflow server` on the stack's mlflow database, artifacts proxied (--serve-artifacts)."""
    workdir = Path(tempfile.mkdtemp(prefix="layermoe-mlflow-"))
    try:
        with running_mlflow_server(stack_databases.mlflow_url, workdir) as server:
            yield server
    finally:
        shutil.rmtree(workdir, ignore_errors=True)


@pytest.fixture(scope="session")
def mlflow_tracking_uri(mlflow_server: MlflowServer) -> str:
    """The http:// tracking (and registry) URI of the session's real MLflow server."""
    return mlflow_server.tracking_uri
