"""A team's tracking server: PostgreSQL (backend store) + `mlflow server` (proxied artifacts).

    python -m scripts.team_server [--dir DIR] [--host 127.0.0.1] [--port 5000]
                                  [--pg-port 55432] [--artifacts-destination DIR_OR_S3_URI]

(`make server` runs it.) The first start creates a PostgreSQL cluster with `initdb` in
DIR/postgres (default ~/.local/share/tonetune/server, /var/lib/tonetune/server as root, or
$TONETUNE_SERVER_DIR), listening on
127.0.0.1 only, and the database `mlflow`; every start then runs `postgres` and `mlflow server
--backend-store-uri postgresql://... --artifacts-destination ...` in the foreground until
Ctrl-C, which stops both (postgres by its PID, fast shutdown). Clients only need
`MLFLOW_TRACKING_URI=http://HOST:PORT`: artifacts go through the server (`mlflow-artifacts:/`),
so no client needs the artifact folder or S3 credentials. For S3 pass
`--artifacts-destination s3://bucket/prefix` (the server's environment holds AWS_* and, for an
S3-compatible store, MLFLOW_S3_ENDPOINT_URL).

PostgreSQL refuses to run as root: as root, the cluster belongs to the `postgres` user (the
Debian package creates it), else `nobody`. The tests (tests/team_fixtures.py) use the same
functions with a throwaway folder.
"""

from __future__ import annotations

import argparse
import glob
import os
import pwd
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

DATABASE = "mlflow"
DB_USER = "tonetune"


class ServerError(RuntimeError):
    """PostgreSQL or mlflow server could not be started."""


def postgres_bin_dir() -> Path | None:
    """Where initdb/postgres live: on PATH, else Debian's /usr/lib/postgresql/<version>/bin."""
    found = shutil.which("initdb")
    if found:
        return Path(os.path.realpath(found)).parent
    candidates = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"), key=lambda p: int(p.split("/")[4]))
    return Path(candidates[-1]).parent if candidates else None


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def run_as() -> pwd.struct_passwd | None:
    """The account PostgreSQL runs as when we are root (it refuses root), else None (ourselves)."""
    if os.geteuid() != 0:
        return None
    for name in ("postgres", "nobody"):
        try:
            return pwd.getpwnam(name)
        except KeyError:
            continue
    raise ServerError("running as root and neither a `postgres` nor a `nobody` user exists")


def _as_user(account: pwd.struct_passwd | None) -> dict:
    return {} if account is None else {"user": account.pw_uid, "group": account.pw_gid, "extra_groups": []}


def _chown_tree(path: Path, account: pwd.struct_passwd | None) -> None:
    if account is None:
        return
    os.chown(path, account.pw_uid, account.pw_gid)
    for child in path.rglob("*"):
        os.chown(child, account.pw_uid, account.pw_gid)


def init_cluster(root: Path) -> Path:
    """`initdb` a cluster in root/postgres (once); trust auth, only reachable on 127.0.0.1."""
    bin_dir = postgres_bin_dir()
    if bin_dir is None:
        raise ServerError("PostgreSQL is not installed (initdb not found): run `make ci-deps` "
                          "(apt-get install -y postgresql)")
    account = run_as()
    data = root / "postgres"
    if (data / "PG_VERSION").is_file():
        return data
    root.mkdir(parents=True, exist_ok=True)
    data.mkdir(mode=0o700, exist_ok=True)
    _chown_tree(data, account)
    os.chmod(root, 0o755)
    subprocess.run(
        [str(bin_dir / "initdb"), "-D", str(data), "-U", DB_USER, "--auth=trust", "-E", "UTF8",
         "--no-locale", "--no-sync"],
        check=True, capture_output=True, text=True, cwd="/", **_as_user(account),
    )
    return data


def start_postgres(root: Path, port: int, log_file, fast: bool = False) -> subprocess.Popen:
    """Run `postgres` on 127.0.0.1:port (socket in root/postgres); returns once it accepts
    connections, after creating the database `mlflow` if missing. `fast` turns fsync off
    (throwaway test clusters only)."""
    data = init_cluster(root)
    account = run_as()
    command = [str(postgres_bin_dir() / "postgres"), "-D", str(data), "-h", "127.0.0.1", "-p", str(port),
               "-k", str(data)]
    if fast:
        command += ["-c", "fsync=off", "-c", "synchronous_commit=off", "-c", "full_page_writes=off"]
    process = subprocess.Popen(command, stdout=log_file, stderr=subprocess.STDOUT, cwd="/",
                               start_new_session=True, **_as_user(account))
    import psycopg2

    deadline = time.monotonic() + 60
    while True:
        if process.poll() is not None:
            raise ServerError(f"postgres exited with {process.returncode} (log: {getattr(log_file, 'name', '?')})")
        try:
            connection = psycopg2.connect(host="127.0.0.1", port=port, user=DB_USER, dbname="postgres",
                                          connect_timeout=2)
            break
        except psycopg2.OperationalError:
            if time.monotonic() > deadline:
                stop(process, signal.SIGINT)
                raise ServerError(f"postgres did not accept connections on 127.0.0.1:{port} within 60 s") from None
            time.sleep(0.3)
    connection.autocommit = True
    with connection.cursor() as cursor:
        cursor.execute("SELECT 1 FROM pg_database WHERE datname = %s", (DATABASE,))
        if cursor.fetchone() is None:
            cursor.execute(f"CREATE DATABASE {DATABASE}")
    connection.close()
    return process


def backend_store_uri(pg_port: int) -> str:
    return f"postgresql+psycopg2://{DB_USER}@127.0.0.1:{pg_port}/{DATABASE}"


def start_mlflow(store_uri: str, artifacts_destination: str, host: str, port: int, log_file,
                 workers: int = 1, env: dict | None = None) -> subprocess.Popen:
    """`mlflow server` over the store, serving artifacts (--artifacts-destination), in its own
    process group. Does not wait: call `wait_healthy`."""
    mlflow_bin = Path(sys.executable).with_name("mlflow")
    return subprocess.Popen(
        [str(mlflow_bin), "server", "--backend-store-uri", store_uri,
         "--artifacts-destination", artifacts_destination, "--host", host, "--port", str(port),
         "--workers", str(workers)],
        stdout=log_file, stderr=subprocess.STDOUT, start_new_session=True,
        env={**os.environ, "MLFLOW_DISABLE_TELEMETRY": "true", **(env or {})},
    )


def wait_healthy(url: str, process: subprocess.Popen, timeout_s: float = 240) -> None:
    """Poll /health until the server answers (first start migrates the schema: ~20-60 s)."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise ServerError(f"mlflow server exited with {process.returncode}")
        try:
            with urllib.request.urlopen(f"{url}/health", timeout=2) as response:
                if response.status == 200:
                    return
        except OSError:
            time.sleep(0.5)
    raise ServerError(f"mlflow server did not answer {url}/health within {timeout_s:.0f} s")


def stop(process: subprocess.Popen, sig: int = signal.SIGTERM, group: bool = False, timeout_s: float = 15) -> None:
    """Stop a process we started, by its PID (or its process group, which we created)."""
    if process.poll() is not None:
        return
    try:
        (os.killpg if group else os.kill)(process.pid, sig)
        process.wait(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        (os.killpg if group else os.kill)(process.pid, signal.SIGKILL)
        process.wait()
    except ProcessLookupError:
        pass


def main(argv: list[str] | None = None) -> int:
    # as root, PostgreSQL runs as another user, who cannot enter /root: keep the state in /var/lib
    home_dir = Path("/var/lib/tonetune/server") if os.geteuid() == 0 else Path.home() / ".local/share/tonetune/server"
    default_dir = os.environ.get("TONETUNE_SERVER_DIR") or str(home_dir)
    parser = argparse.ArgumentParser(prog="python -m scripts.team_server", description=__doc__.split("\n\n")[0])
    parser.add_argument("--dir", type=Path, default=Path(default_dir), help=f"state folder (default {default_dir})")
    parser.add_argument("--host", default=os.environ.get("HOST", "127.0.0.1"),
                        help="address mlflow listens on (0.0.0.0 for the team's network)")
    parser.add_argument("--port", type=int, default=int(os.environ.get("PORT", "5000")))
    parser.add_argument("--pg-port", type=int, default=int(os.environ.get("PG_PORT", "55432")))
    parser.add_argument("--artifacts-destination", default=os.environ.get("ARTIFACTS_DESTINATION"),
                        help="folder or s3://bucket/prefix (default DIR/artifacts)")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--no-fsync", action="store_true", help="PostgreSQL without fsync: throwaway clusters (tests) only")
    args = parser.parse_args(argv)
    root = args.dir.expanduser().resolve()
    destination = args.artifacts_destination or str(root / "artifacts")
    if "://" not in destination:
        Path(destination).mkdir(parents=True, exist_ok=True)
    root.mkdir(parents=True, exist_ok=True)

    def _terminate(signum, frame):  # `kill PID` stops both servers like Ctrl-C
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, _terminate)
    with open(root / "postgres.log", "ab") as pg_log:
        try:
            postgres = start_postgres(root, args.pg_port, pg_log, fast=args.no_fsync)
        except ServerError as error:
            print(f"error: {error}", file=sys.stderr)
            return 2
        server = start_mlflow(backend_store_uri(args.pg_port), destination, args.host, args.port, None, args.workers)
        (root / "mlflow.pid").write_text(f"{server.pid}\n")
        url = f"http://{'127.0.0.1' if args.host in ('0.0.0.0', '::') else args.host}:{args.port}"
        try:
            wait_healthy(url, server)
            print(f"tracking server ready: export MLFLOW_TRACKING_URI={url}  (store {backend_store_uri(args.pg_port)}, "
                  f"artifacts {destination}); Ctrl-C stops it", flush=True)
            server.wait()
        except KeyboardInterrupt:
            pass
        except ServerError as error:
            print(f"error: {error}", file=sys.stderr)
        finally:
            stop(server, signal.SIGTERM, group=True)
            stop(postgres, signal.SIGINT)  # PostgreSQL's "fast shutdown"
            (root / "mlflow.pid").unlink(missing_ok=True)
            print("tracking server stopped", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
