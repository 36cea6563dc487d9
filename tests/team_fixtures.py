"""The team's tracking server for the tests: a throwaway PostgreSQL cluster (`initdb` in a temp
folder, 127.0.0.1, stopped by PID) under a real `mlflow server` with proxied artifacts. One per
session (tests/conftest.py imports the fixture); scripts/team_server.py is the same code
`make server` runs.

Without PostgreSQL the tests that need it skip with the reason, except under CI (`CI` set),
where .ci/run installs it (`make ci-deps`) and a missing one is an error.
"""

from __future__ import annotations

import os
import shutil
import signal
import tempfile
from pathlib import Path

import pytest

from scripts import team_server


def require_postgres() -> None:
    if team_server.postgres_bin_dir() is None:
        message = "PostgreSQL is not installed (no initdb): `make ci-deps` installs it (apt-get install -y postgresql)"
        if os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message)


@pytest.fixture(scope="session")
def team_server_info():
    """Starts PostgreSQL + `mlflow server` and yields {uri, store_uri, artifacts, ready()} as soon as
    both are started; `ready()` waits for /health (the first start migrates the schema: ~20-60 s on
    the shared 2-core machine), so a caller can prepare its workspace meanwhile."""
    require_postgres()
    # not under pytest's 0700 tmp folders: the cluster runs as another user when we are root
    root = Path(tempfile.mkdtemp(prefix="tonetune-team-server-"))
    os.chmod(root, 0o755)
    artifacts = root / "artifacts"
    artifacts.mkdir()
    pg_log = open(root / "postgres.log", "wb")
    mlflow_log = open(root / "mlflow.log", "wb")
    pg_port, port = team_server.free_port(), team_server.free_port()
    postgres = team_server.start_postgres(root, pg_port, pg_log, fast=True)
    store = team_server.backend_store_uri(pg_port)
    server = team_server.start_mlflow(store, str(artifacts), "127.0.0.1", port, mlflow_log, workers=2)
    uri = f"http://127.0.0.1:{port}"
    state = {"healthy": False}

    def ready() -> None:
        if not state["healthy"]:
            try:
                team_server.wait_healthy(uri, server)
            except team_server.ServerError as error:
                mlflow_log.flush()
                raise RuntimeError(f"{error}: {(root / 'mlflow.log').read_text()[-3000:]}") from None
            state["healthy"] = True

    try:
        yield {"uri": uri, "store_uri": store, "artifacts": artifacts, "root": root, "ready": ready,
               "postgres_pid": postgres.pid}
    finally:
        team_server.stop(server, signal.SIGTERM, group=True, timeout_s=5)
        team_server.stop(postgres, signal.SIGINT)  # fast shutdown, by PID
        pg_log.close()
        mlflow_log.close()
        try:
            from registry.promote import lock_path_for

            lock_path_for(uri).unlink(missing_ok=True)
        finally:
            shutil.rmtree(root, ignore_errors=True)
