"""The team's tracking server for the tests: exactly what `make server` runs
(`python -m scripts.team_server`: a PostgreSQL cluster made with `initdb` in a throwaway folder,
listening on 127.0.0.1, under a real `mlflow server` with proxied artifacts), one per session
(tests/conftest.py imports the fixture), stopped the way a user stops it (SIGTERM to the script,
which stops mlflow and then PostgreSQL by its PID); teardown checks both are gone.

Without PostgreSQL the tests that need it skip with the reason, except under CI (`CI` set),
where .ci/run installs it (`make ci-deps`) and a missing one is an error.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
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


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


@pytest.fixture(scope="session")
def team_server_info():
    """Starts the server and yields {uri, store_uri, artifacts, root, ready()} at once; `ready()`
    waits for /health (the first start migrates the schema: ~30-60 s on the shared 2-core
    machine), so a caller can prepare its workspace meanwhile."""
    require_postgres()
    # not under pytest's 0700 tmp folders: the cluster runs as another user when we are root
    root = Path(tempfile.mkdtemp(prefix="tonetune-team-server-"))
    os.chmod(root, 0o755)
    pg_port, port = team_server.free_port(), team_server.free_port()
    log = open(root / "server.log", "wb")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(Path(__file__).parent.parent),
                                                                     os.environ.get("PYTHONPATH")]))}
    script = subprocess.Popen(
        [sys.executable, "-m", "scripts.team_server", "--dir", str(root), "--host", "127.0.0.1", "--port", str(port),
         "--pg-port", str(pg_port), "--workers", "2", "--no-fsync"],
        stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True,
    )
    uri = f"http://127.0.0.1:{port}"
    state = {"healthy": False}

    def ready() -> None:
        if not state["healthy"]:
            try:
                team_server.wait_healthy(uri, script)
            except team_server.ServerError as error:
                log.flush()
                raise RuntimeError(f"{error}: {(root / 'server.log').read_text()[-3000:]}") from None
            state["healthy"] = True

    try:
        yield {"uri": uri, "store_uri": team_server.backend_store_uri(pg_port), "artifacts": root / "artifacts",
               "root": root, "ready": ready}
    finally:
        pidfile = root / "postgres" / "postmaster.pid"
        postgres_pid = int(pidfile.read_text().split()[0]) if pidfile.is_file() else None
        mlflow_pidfile = root / "mlflow.pid"
        mlflow_pid = int(mlflow_pidfile.read_text()) if mlflow_pidfile.is_file() else None
        team_server.stop(script, signal.SIGTERM, timeout_s=30)
        leftovers = [pid for pid in (postgres_pid, mlflow_pid) if pid and pid_alive(pid)]
        for pid in leftovers:  # only if the script failed to stop them (then the assert below says so)
            os.kill(pid, signal.SIGKILL)
        log.close()
        try:
            from registry.store import lock_path_for

            lock_path_for(uri).unlink(missing_ok=True)
        finally:
            shutil.rmtree(root, ignore_errors=True)
        assert not leftovers, f"stopping scripts.team_server left processes {leftovers} running"
