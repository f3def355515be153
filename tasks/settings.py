"""Where instructflow keeps its state and how it finds its services, read from the environment in this one place.

Everything a run writes lives under one state directory (default `.instructflow/` in the checkout,
INSTRUCTFLOW_STATE_DIR moves it); deleting it resets the machine, and nothing is written to `~`.
Each service has an embedded default and a scale-out switch:

  Prefect  ephemeral API in-process, its database in the state dir  | PREFECT_API_URL -> a Prefect server
  Ray      a local ray.init(), temp files and auth token in state    | RAY_ADDRESS -> an existing cluster
  MLflow   SQLite + local artifacts in the state dir                 | MLFLOW_TRACKING_URI -> a tracking server

`apply_environment()` runs when `tasks` is first imported, before Prefect, Ray or MLflow read their settings.
Tokens are never read here into code paths that log: they stay in the environment or in files in the state dir.
"""

from __future__ import annotations

import fcntl
import json
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

CHECKOUT = Path(__file__).resolve().parents[1]


def state_dir() -> Path:
    """The state directory, created on first use, readable by this user only (0700): it holds checkpoints, the
    services' databases and their tokens."""
    path = Path(os.environ.get("INSTRUCTFLOW_STATE_DIR") or CHECKOUT / ".instructflow").resolve()
    path.mkdir(mode=0o700, parents=True, exist_ok=True)
    private(path)
    return path


def private(path: Path) -> None:
    """Make a directory this user owns 0700 (one made by an older version, or under a loose umask)."""
    info = path.stat()
    if info.st_uid == os.getuid() and info.st_mode & 0o077:
        path.chmod(0o700)


@contextmanager
def file_lock(path: Path) -> Iterator[None]:
    """One holder at a time among this machine's processes: an advisory lock on the file at `path`."""
    with open(path, "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def exclusive(name: str):
    """file_lock on <state>/locks/<name>.lock (e.g. "promotion")."""
    folder = state_dir() / "locks"
    folder.mkdir(mode=0o700, exist_ok=True)
    return file_lock(folder / f"{name}.lock")


def cache_dir() -> Path:
    """Downloaded carrier packages and files extracted from them (safe to delete; refetched on demand).

    INSTRUCTFLOW_CACHE_DIR can share one cache between several state directories (the tests do).
    """
    path = Path(os.environ.get("INSTRUCTFLOW_CACHE_DIR") or state_dir() / "cache").resolve()
    path.mkdir(parents=True, exist_ok=True)
    return path


def stage_dir(stage: str, key: str) -> Path:
    """Where one stage's outputs for one input+config key live: <state>/stages/<stage>/<key>/."""
    return state_dir() / "stages" / stage / key


def mlflow_tracking_uri() -> str:
    return os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{state_dir() / 'mlflow' / 'mlflow.db'}"


def mlflow_artifact_root() -> str:
    """Artifact location for experiments this project creates (only used with the embedded SQLite store)."""
    return (state_dir() / "mlflow" / "artifacts").as_uri()


def ray_address() -> str | None:
    """An existing Ray cluster to attach to, or None for a local one started on demand."""
    return os.environ.get("RAY_ADDRESS") or None


def ray_temp_dir() -> Path:
    """Ray's session files; kept short because Ray's socket paths must fit in 107 bytes."""
    return state_dir() / "ray"


def service_endpoints() -> dict[str, str]:
    """The servers `make up` started for this state dir (PREFECT_API_URL, MLFLOW_TRACKING_URI, maybe RAY_ADDRESS).

    `make up` writes <state>/services/endpoints.json and `make down` removes it, so between the two every command
    uses the servers, and otherwise the embedded defaults. If a server dies meanwhile, commands fail with a message
    naming it (rather than silently splitting the history between a server and the embedded store).
    """
    path = state_dir() / "services" / "endpoints.json"
    try:
        recorded = json.loads(path.read_text())
    except (FileNotFoundError, ValueError):
        return {}
    return {k: str(v) for k, v in recorded.items() if k in ("PREFECT_API_URL", "MLFLOW_TRACKING_URI", "RAY_ADDRESS")}


def apply_environment() -> None:
    """Point Prefect, Ray and MLflow at the state dir (or at the servers `make up` started) and turn off their
    telemetry, unless already set."""
    state = state_dir()
    for name, value in service_endpoints().items():
        os.environ.setdefault(name, value)
    (state / "mlflow").mkdir(exist_ok=True)
    (state / "ray").mkdir(exist_ok=True)
    defaults = {
        "PREFECT_HOME": state / "prefect",
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
        # the project's own log lines (tasks.*, flows.*) reach the flow run's log in the Prefect UI too
        "PREFECT_LOGGING_EXTRA_LOGGERS": "tasks,flows",
        # a cold ephemeral server takes 12-26 s on 2 cores; Prefect's default of 20 s is too tight
        "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS": "120",
        "RAY_USAGE_STATS_ENABLED": "0",
        # A local Ray otherwise advertises the machine's network address (it maps 127.0.0.1 to it); with its
        # multi-node mode off, the one node and its workers talk over loopback. A RAY_ADDRESS cluster is unaffected.
        **({} if ray_address() else {"RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0"}),
        "RAY_AUTH_TOKEN_PATH": state / "ray" / "auth_token",
        "RAY_TMPDIR": state / "ray",
        # Ray Train's controller polls workers every few seconds; each report() would wait that long
        "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "0.2",
        "MLFLOW_TRACKING_URI": mlflow_tracking_uri(),
        "MLFLOW_DISABLE_TELEMETRY": "true",
        # MLflow's client retries a refused request 7 times with doubling waits (minutes); a stage whose server
        # went away should say so within ~15 s
        "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "4",
        "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1",
        "TORCHINDUCTOR_CACHE_DIR": state / "torchinductor",
    }
    for name, value in defaults.items():
        os.environ.setdefault(name, str(value))
