"""`python -m registry serve` (`make serve`): MLflow's scoring server on a model the project names.

    python -m registry serve                                   # models:/<promote.registered_model_name>@production
    python -m registry serve models:/tonetune-conversational/3
    python -m registry serve lora-fp32-r32-lr0.0003-n150        # an evaluated adapter, registered or not

Resolves the target first and says in one line what is missing (no store, no such version, no
Production version yet, no evaluated adapter of that name), before any model loads; then replaces
itself with `mlflow models serve -m <uri> --env-manager local`, so the server, its logs and its
exit code are MLflow's own. A models:/ alias is pinned to the version it names at start.

Why a front at all: after a demo whose rule did not promote (the default demo ends "inconclusive"),
`mlflow models serve -m models:/<name>@production` ends in a traceback. Here the user reads why,
and how to serve the evaluated adapter anyway, which is the same logged pyfunc the registry would
hold (registry/replay.py resolves it the same way).
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

from pipeline.core.config import PREDICTIONS_DIR
from pipeline.core.errors import TonetuneError
from registry.replay import adapter_model_uri, registered_version
from registry.store import PRODUCTION, all_versions

REQUEST_TIMEOUT_ENV = "MLFLOW_SCORING_SERVER_REQUEST_TIMEOUT"
REQUEST_TIMEOUT_S = "600"  # a request of 100 questions decodes for minutes on 2 cores (docs/registry.md)


def evaluated_adapters(predictions_dir: Path = PREDICTIONS_DIR) -> list[str]:
    """Names of the evaluated models that have a training run (adapters, not the prompted base)."""
    names = []
    for record in sorted(Path(predictions_dir).glob("*.json")):
        try:
            if json.loads(record.read_text()).get("training_run_id"):
                names.append(record.stem)
        except (OSError, ValueError):
            continue
    return names


def no_production_hint(client, name: str, predictions_dir: Path = PREDICTIONS_DIR) -> str:
    """Why `name` has no Production version, and what can be served instead (one clause each)."""
    registered = len(all_versions(client, name))
    why = (f"{registered} version(s) are registered, none holds alias {PRODUCTION} (`python -m registry list`)"
           if registered else "the promotion rule has promoted no finalist yet (`python -m registry summary` says why)")
    adapters = evaluated_adapters(predictions_dir)
    instead = (f"; to serve an evaluated adapter anyway: make serve TARGET={adapters[0]}"
               + (f" (evaluated: {', '.join(adapters)})" if len(adapters) > 1 else "")) if adapters else ""
    return why + instead


def served_uri(client, target: str, predictions_dir: Path = PREDICTIONS_DIR) -> str:
    """The URI to serve for `target` (a models:/ URI or an evaluated adapter's name), checked to exist."""
    if not target.startswith("models:/"):
        return adapter_model_uri(client, target, predictions_dir)
    def explain(name: str, alias: str) -> str:
        if alias == PRODUCTION:
            return no_production_hint(client, name, predictions_dir)
        return "`python -m registry list` shows the aliases"

    version = registered_version(client, target, explain)
    return f"models:/{version.name}/{version.version}"


def serve_command(uri: str, host: str, port: int) -> list[str]:
    """`mlflow models serve` from this interpreter's environment, on the project's environment."""
    mlflow_bin = Path(sys.executable).with_name("mlflow")
    return [str(mlflow_bin), "models", "serve", "-m", uri, "--env-manager", "local", "--host", host, "--port", str(port)]


def run_serve(target: str | None, host: str, port: int, config) -> None:
    """Resolve `target` (default: the registered model's production alias), then exec MLflow's server."""
    from pipeline.core.tracking import open_client

    if not 0 < port < 65536:
        raise TonetuneError(f"--port {port}: not a TCP port (1-65535)")
    target = target or f"models:/{config.promote.registered_model_name}@{PRODUCTION}"
    client = open_client(config.tracking)
    uri = served_uri(client, target)
    command = serve_command(uri, host, port)
    if not Path(command[0]).is_file():
        raise TonetuneError(f"{command[0]} not found: install the project's environment first (make setup)")
    env = dict(os.environ)
    env.setdefault(REQUEST_TIMEOUT_ENV, REQUEST_TIMEOUT_S)
    # the scoring server starts `uvicorn` from PATH: this environment's bin folder goes first
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    print(f"serve: {target} -> {uri} on http://{host}:{port} (POST /invocations; request timeout "
          f"{env[REQUEST_TIMEOUT_ENV]} s)", flush=True)
    os.execve(command[0], command, env)
