"""Starts, stops and reports on instructflow's local servers: the code behind `make up`, `make down`, `make status`.

    python -m infra.services up [--ray] [SERVICE ...]   start what is not running yet, wait until healthy, print URLs
    python -m infra.services down [SERVICE ...]         stop in reverse order, strays included; remove pid files
    python -m infra.services status [--ray]             one line per service; exit 0 when all run, 3 when not

Services, in start order (each binds 127.0.0.1; a busy port is an error, never silently another port):

    mlflow          tracking server on <state>/mlflow/mlflow.db (the embedded mode's file)    MLFLOW_PORT (5000)
    prefect-server  API and UI, its database in <state>/prefect                              PREFECT_PORT (4200)
    ray             a Ray head, only with --ray (RAY=1); token auth, files in <state>/ray      RAY_PORT (6379),
                    RAY_DASHBOARD_PORT (8265), RAY_CLIENT_SERVER_PORT (10001)
    prefect-worker  a process worker on the work pool INSTRUCTFLOW_WORK_POOL (instructflow), run from the checkout
    labelstudio     delegated to infra/labelstudio/labelstudio.sh (its own pid, log, credentials)  LABEL_STUDIO_PORT (8080)

Ray starts before the worker: the worker's environment is what every flow run inherits, and it must already hold
RAY_ADDRESS. Each of our processes leads its own session and has <state>/services/<name>.pid and <name>.log; `up`
writes <state>/services/endpoints.json, which tasks/settings.py reads, so commands run between `make up` and
`make down` use the servers. Settings are read from the environment at call time. Besides the standard library it
needs only psutil (to see processes), imported on first use: none of the pipeline's dependencies.
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import json
import os
import re
import secrets
import shlex
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path

CHECKOUT = Path(__file__).resolve().parents[1]
LABELSTUDIO_SCRIPT = CHECKOUT / "infra" / "labelstudio" / "labelstudio.sh"
HOST = "127.0.0.1"

ORDER = ["mlflow", "prefect-server", "ray", "prefect-worker", "labelstudio"]  # start order; `down` reverses it
DEFAULT_SERVICES = ["mlflow", "prefect-server", "prefect-worker", "labelstudio"]  # `up` without --ray
TITLES = {"mlflow": "MLflow", "prefect-server": "Prefect server", "ray": "Ray head", "prefect-worker": "Prefect worker",
          "labelstudio": "Label Studio"}
PROGRAMS = {"mlflow": "mlflow", "prefect-server": "prefect", "ray": "ray", "prefect-worker": "prefect"}  # in bin/
PORT_VARIABLES = {"mlflow": ["MLFLOW_PORT"], "prefect-server": ["PREFECT_PORT"],
                  "ray": ["RAY_PORT", "RAY_DASHBOARD_PORT", "RAY_CLIENT_SERVER_PORT"], "prefect-worker": [],
                  "labelstudio": ["LABEL_STUDIO_PORT"]}
# (Ray keeps 10002-19999 for its workers: RAY_CLIENT_SERVER_PORT must lie outside that range.)
DEFAULT_PORTS = {"MLFLOW_PORT": 5000, "PREFECT_PORT": 4200, "RAY_PORT": 6379, "RAY_DASHBOARD_PORT": 8265,
                 "RAY_CLIENT_SERVER_PORT": 10001, "LABEL_STUDIO_PORT": 8080}
# Seconds to become healthy on a busy 2-core machine (measured: MLflow ~16 s, Prefect 8-27 s, Ray ~13 s, worker ~5 s).
START_TIMEOUT_S = {"mlflow": 180.0, "prefect-server": 180.0, "ray": 180.0, "prefect-worker": 120.0}
# Seconds between SIGTERM and SIGKILL. The Prefect worker waits on SIGTERM for its flow runs to finish; `down`
# has already signalled those, so it gets little time.
STOP_TIMEOUT_S = {"mlflow": 15.0, "prefect-server": 15.0, "ray": 20.0, "prefect-worker": 10.0, "labelstudio": 20.0}
# Set on each process we start, so a pid file is trusted only for a process that carries it (not a reused pid).
MARKER = "INSTRUCTFLOW_SERVICE"
# Ray's socket paths (<temp>/session_<date>_<time>_<pid>/sockets/plasma_store) must fit in 107 bytes.
RAY_SOCKET_SUFFIX_BYTES = 64


class ServiceError(Exception):
    """A service could not be started, stopped or found; the message names it and says what to do.

    `log_tail` holds the last lines of the service's log when it failed to start (printed before the message).
    """

    def __init__(self, message: str, log_tail: str = ""):
        super().__init__(message)
        self.log_tail = log_tail


def say(message: str) -> None:
    print(f"services: {message}", flush=True)


# --- settings, read at call time -------------------------------------------------------------------------------

def state_dir() -> Path:
    return Path(os.environ.get("INSTRUCTFLOW_STATE_DIR") or CHECKOUT / ".instructflow").resolve()


def services_dir() -> Path:
    return state_dir() / "services"


def pid_file(name: str) -> Path:
    return services_dir() / f"{name}.pid"


def log_file(name: str) -> Path:
    return services_dir() / f"{name}.log"


def endpoints_file() -> Path:
    return services_dir() / "endpoints.json"


def labelstudio_credentials() -> Path:
    return state_dir() / "labelstudio" / "credentials.json"


def port(variable: str) -> int:
    value = os.environ.get(variable) or str(DEFAULT_PORTS[variable])
    if not value.isdigit() or not 0 < int(value) < 65536:
        raise ServiceError(f"{variable}={value!r} is not a port number")
    return int(value)


def work_pool() -> str:
    return os.environ.get("INSTRUCTFLOW_WORK_POOL") or "instructflow"


def ray_token_path() -> Path:
    """Where the Ray head's auth token lives: RAY_AUTH_TOKEN_PATH, else <state>/ray/auth_token (as tasks/settings)."""
    return Path(os.environ.get("RAY_AUTH_TOKEN_PATH") or state_dir() / "ray" / "auth_token")


def executable(program: str) -> Path:
    """A console script of the venv that runs this module (prefect, mlflow, ray): never one found on PATH."""
    path = Path(sys.executable).parent / program
    if not os.access(path, os.X_OK):
        raise ServiceError(f"{path} not found: run `make install` (the services run from this Python's venv)")
    return path


def marker(name: str) -> str:
    return f"{name}:{state_dir()}"


# --- processes, seen through psutil ------------------------------------------------------------------------------
#
# psutil comes with `make install` (the test extra in pyproject.toml) and is imported on first use, not with this
# module: infra/labelstudio/control.py imports alive() and port_in_use() from here under whatever `python3` runs
# labelstudio.sh, which may lack it (see alive()).

def _psutil():
    try:
        import psutil
    except ModuleNotFoundError as missing:
        raise ServiceError(f"psutil is not installed for {sys.executable}: run `make install`") from missing
    return psutil


def alive(pid: int) -> bool:
    """True while `pid` runs (a zombie, dead but not yet reaped, counts as gone).

    Without psutil (control.py under a bare python3) the state letter is read from /proc/<pid>/stat instead.
    """
    try:
        import psutil
    except ModuleNotFoundError:
        try:
            return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
        except (FileNotFoundError, ProcessLookupError, IndexError):
            return False
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except (psutil.NoSuchProcess, ValueError):  # ZombieProcess is a NoSuchProcess too
        return False
    except psutil.AccessDenied:  # someone else's process: it exists
        return True


def _argv(pid: int) -> list[str]:
    psutil = _psutil()
    try:
        return psutil.Process(pid).cmdline()
    except (psutil.NoSuchProcess, psutil.AccessDenied, ValueError):
        return []


def _environ(pid: int) -> dict[str, str]:
    """The environment a process started with."""
    psutil = _psutil()
    try:
        return psutil.Process(pid).environ()
    except (psutil.NoSuchProcess, psutil.AccessDenied, ValueError):
        return {}


def _option(argv: list[str], flag: str) -> str | None:
    """The value after `flag` in a command line."""
    for i, arg in enumerate(argv[:-1]):
        if arg == flag:
            return argv[i + 1]
    return None


def _is_ours(pid: int, name: str) -> bool:
    """The pid runs our program with our marker (and is not some other process that reused the number)."""
    program = f"/{PROGRAMS[name]}"
    return (alive(pid) and any(arg.endswith(program) for arg in _argv(pid))
            and _environ(pid).get(MARKER) == marker(name))


def _process_table() -> dict[int, tuple[int, int, int, object]]:
    """Every process: pid -> (parent pid, process group, session, its psutil.Process).

    Fresh psutil.Process objects, not process_iter()'s cached ones: a cached object can predate a reuse of its pid.
    """
    psutil = _psutil()
    table = {}
    for pid in psutil.pids():
        try:
            process = psutil.Process(pid)
            table[pid] = (process.ppid(), os.getpgid(pid), os.getsid(pid), process)
        except (psutil.NoSuchProcess, psutil.AccessDenied, ProcessLookupError, PermissionError):
            continue  # gone since it was listed (or not ours to see)
    return table


def _family(leader: int) -> dict[int, object]:
    """The leader, its descendants and the members of its process group and session: pid -> psutil.Process.

    Each psutil.Process holds the start time of the process it was made for, which is how _still_running tells it from
    a later process with the same pid. Children that moved to a session of their own (Prefect's flow runs, Ray's
    reaper) are found through their parents, so this runs before any signal: an orphan is reparented away and can no
    longer be traced to us.
    """
    table = _process_table()
    family = {pid: process for pid, (_, group, session, process) in table.items()
              if pid == leader or group == leader or session == leader}
    grew = True
    while grew:
        children = {pid: process for pid, (parent, _, _, process) in table.items()
                    if parent in family and pid not in family}
        family.update(children)
        grew = bool(children)
    return family


def _still_running(family: dict[int, object]) -> dict[int, object]:
    """The members that still run as the same processes (same start time: not a pid reused since), zombies excluded."""
    psutil = _psutil()
    running = {}
    for pid, process in family.items():
        try:
            # is_running() compares the start time psutil read when the object was made with the pid's current one
            if process.is_running() and process.status() != psutil.STATUS_ZOMBIE:
                running[pid] = process
        except psutil.NoSuchProcess:  # gone (or a zombie) between the two calls
            continue
    return running


def _signal(family: dict[int, object], leader: int, sig: signal.Signals) -> None:
    """One signal to each: the leader's group at once, then each member outside it (a second SIGTERM often means
    "force", e.g. to Prefect's worker). The group is signalled only while one of the family is still in it."""
    groups = {}
    for pid in _still_running(family):
        with contextlib.suppress(ProcessLookupError, PermissionError):
            groups[pid] = os.getpgid(pid)
    if leader in groups.values():
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(leader, sig)  # the leader started its own session: its group id is its pid
    for pid, group in groups.items():
        if group != leader:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(pid, sig)


def _reap(pids) -> None:
    """Collect the exit status of any of them that is our own child (else they would linger as zombies)."""
    for pid in pids:
        with contextlib.suppress(ChildProcessError, OSError):
            os.waitpid(pid, os.WNOHANG)


def _terminate(leader: int, timeout_s: float, family: dict[int, object] | None = None) -> None:
    """SIGTERM to the leader's group and every descendant, SIGKILL to whatever still runs after `timeout_s`.

    `family` is the leader's family when it was walked earlier (the leader may be gone since); else it is walked now.
    """
    family = dict(family) if family is not None else _family(leader)
    for sig, wait_s in ((signal.SIGTERM, timeout_s), (signal.SIGKILL, 10.0)):
        _signal(family, leader, sig)
        deadline = time.monotonic() + wait_s
        while True:
            _reap(family)
            running = _still_running(family)
            if not running:
                return
            if time.monotonic() > deadline:
                break
            for pid in running:  # children forked meanwhile (a flow run starting as the worker stops)
                family |= {p: s for p, s in _family(pid).items() if p not in family}
            time.sleep(0.2)
    raise ServiceError(f"pids {sorted(_still_running(family))} survived SIGKILL")


# --- the network -------------------------------------------------------------------------------------------------

_DIRECT = urllib.request.build_opener(urllib.request.ProxyHandler({}))  # loopback never goes through a proxy


def _request(url: str, body: dict | None = None, headers: dict | None = None, timeout: float = 3.0):
    """(status, parsed JSON or None) of a GET (or a POST of `body`), or (None, None) when nothing answers."""
    data = None if body is None else json.dumps(body).encode()
    request = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json", **(headers or {})})
    try:
        with _DIRECT.open(request, timeout=timeout) as response:
            raw = response.read()
            status = response.status
    except urllib.error.HTTPError as error:
        return error.code, None
    except (OSError, ValueError):
        return None, None
    try:
        return status, json.loads(raw)
    except ValueError:
        return status, None


def port_in_use(number: int) -> bool:
    """Someone listens on the port, or it cannot be bound on 127.0.0.1 (TIME_WAIT leftovers are no obstacle)."""
    with socket.socket() as probe:
        probe.settimeout(1)
        if probe.connect_ex((HOST, number)) == 0:
            return True
    with socket.socket() as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind((HOST, number))
        except OSError:
            return True
    return False


def _accepts(number: int) -> bool:
    with socket.socket() as probe:
        probe.settimeout(2)
        return probe.connect_ex((HOST, number)) == 0


# --- Label Studio, through its own script ------------------------------------------------------------------------

def _labelstudio(command: str) -> subprocess.CompletedProcess:
    env = os.environ | {"INSTRUCTFLOW_STATE_DIR": str(state_dir()), "LABEL_STUDIO_PORT": str(port("LABEL_STUDIO_PORT"))}
    return subprocess.run([str(LABELSTUDIO_SCRIPT), command], env=env, cwd=CHECKOUT, stdin=subprocess.DEVNULL,
                          capture_output=True, text=True)


def _labelstudio_running() -> tuple[int, str] | None:
    """(pid, URL) of this state dir's Label Studio, from `labelstudio.sh status`; None when it does not run."""
    done = _labelstudio("status")
    found = re.search(r"running at (\S+) \(pid (\d+)\)", done.stdout)
    if done.returncode != 0 or not found:
        return None
    url = found.group(1) if found.group(1).startswith("http") else f"http://{HOST}:{port('LABEL_STUDIO_PORT')}"
    return int(found.group(2)), url


def _labelstudio_error(done: subprocess.CompletedProcess, doing: str) -> ServiceError:
    errors = [line.split("error:", 1)[1].strip() for line in (done.stdout + done.stderr).splitlines() if "error:" in line]
    reason = errors[-1] if errors else f"exited with code {done.returncode}"
    log = state_dir() / "labelstudio" / "server.log"
    return ServiceError(f"Label Studio: {doing} failed: {reason} (log: {log})", _tail(log))


# --- what runs ---------------------------------------------------------------------------------------------------

def _recorded_pid(name: str) -> int | None:
    """The pid in <name>.pid when that process is ours; a stale pid file is removed."""
    path = pid_file(name)
    try:
        pid = int(path.read_text().split()[0])
    except (FileNotFoundError, ValueError, IndexError):
        return None
    if _is_ours(pid, name):
        return pid
    path.unlink(missing_ok=True)
    return None


def running(name: str) -> int | None:
    """The pid of the service when it runs, else None."""
    if name == "labelstudio":
        found = _labelstudio_running()
        return found[0] if found else None
    return _recorded_pid(name)


def url(name: str, pid: int | None) -> str:
    """Where the service answers: read from the running process's command line, else from the settings."""
    argv = _argv(pid) if pid else []
    if name == "mlflow":
        return f"http://{HOST}:{_option(argv, '--port') or port('MLFLOW_PORT')}"
    if name == "prefect-server":
        return f"http://{HOST}:{_option(argv, '--port') or port('PREFECT_PORT')}"
    if name == "ray":
        return f"http://{HOST}:{_option(argv, '--dashboard-port') or port('RAY_DASHBOARD_PORT')}"
    if name == "prefect-worker":
        api = _environ(pid).get("PREFECT_API_URL") if pid else None
        server = api.removesuffix("/api") if api else url("prefect-server", running("prefect-server"))
        return f"{server}/work-pools/work-pool/{urllib.parse.quote(_option(argv, '--pool') or work_pool())}"
    found = _labelstudio_running() if pid else None
    return found[1] if found else f"http://{HOST}:{port('LABEL_STUDIO_PORT')}"


def ray_address(pid: int) -> str:
    return f"{HOST}:{_option(_argv(pid), '--port') or port('RAY_PORT')}"


def healthy(name: str, pid: int) -> bool:
    """The service answers its health check (the process alone running is not enough)."""
    if not alive(pid):
        return False
    if name == "mlflow":
        return _request(f"{url(name, pid)}/health")[0] == 200
    if name == "prefect-server":
        return _request(f"{url(name, pid)}/api/health")[0] == 200
    if name == "labelstudio":
        return _request(f"{url(name, pid)}/health")[0] == 200
    if name == "ray":
        gcs = int(ray_address(pid).rsplit(":", 1)[1])
        token_path = Path(_environ(pid).get("RAY_AUTH_TOKEN_PATH") or ray_token_path())
        with contextlib.suppress(OSError):
            token = token_path.read_text().strip()
            return _accepts(gcs) and _request(f"{url(name, pid)}/api/gcs_healthz",
                                              headers={"Authorization": f"Bearer {token}"})[0] == 200
        return False
    return _worker_online(pid)


def _worker_online(pid: int) -> bool:
    """The worker's work pool lists it (by the unique name it was started with) as ONLINE."""
    argv, api = _argv(pid), _environ(pid).get("PREFECT_API_URL")
    name, pool = _option(argv, "--name"), _option(argv, "--pool")
    if not (api and name and pool):
        return False
    status, workers = _request(f"{api}/work_pools/{urllib.parse.quote(pool)}/workers/filter", body={})
    return status == 200 and any(w.get("name") == name and w.get("status") == "ONLINE" for w in workers or [])


# --- starting ------------------------------------------------------------------------------------------------------

def _tail(path: Path, offset: int = 0, lines: int = 15) -> str:
    """The last lines of a log, from `offset` on (this start's part of an append-only log)."""
    with contextlib.suppress(OSError):
        with open(path, "rb") as log:
            log.seek(offset)
            text = log.read().decode(errors="replace")
        return "\n".join([line for line in text.splitlines() if line.strip()][-lines:])
    return ""


def _launch(name: str, command: list[str], env: dict[str, str], cwd: Path) -> int:
    """Start one of our services in its own session, then wait until it is healthy; returns its pid.

    A process that exits, or is not healthy within its timeout, fails `up` with the tail of its log.
    """
    log_path = log_file(name)
    offset = log_path.stat().st_size if log_path.exists() else 0
    with open(log_path, "ab") as log:
        log.write(f"\n=== {time.strftime('%Y-%m-%d %H:%M:%S')} services: start {name}\n".encode())
        log.flush()
        process = subprocess.Popen(command, env=env | {MARKER: marker(name)}, cwd=cwd, stdin=subprocess.DEVNULL,
                                   stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    pid_file(name).write_text(f"{process.pid}\n")
    say(f"{name}: starting (pid {process.pid}, log {log_path})")
    deadline = time.monotonic() + START_TIMEOUT_S[name]
    try:
        while not healthy(name, process.pid):
            if process.poll() is not None:
                raise ServiceError(f"{TITLES[name]} exited with code {process.returncode} before it was healthy "
                                   f"(log: {log_path})", _tail(log_path, offset))
            if time.monotonic() > deadline:
                raise ServiceError(f"{TITLES[name]} was not healthy after {START_TIMEOUT_S[name]:.0f} s "
                                   f"(log: {log_path})", _tail(log_path, offset))
            time.sleep(0.5)
    except BaseException:  # a failed or interrupted start leaves nothing behind
        with contextlib.suppress(ServiceError):
            _terminate(process.pid, STOP_TIMEOUT_S[name])
        pid_file(name).unlink(missing_ok=True)
        raise
    return process.pid


def _mlflow() -> tuple[list[str], dict[str, str], Path]:
    store = state_dir() / "mlflow"
    (store / "artifacts").mkdir(parents=True, exist_ok=True)
    command = [str(executable("mlflow")), "server", "--host", HOST, "--port", str(port("MLFLOW_PORT")),
               "--workers", "1", "--backend-store-uri", f"sqlite:///{store / 'mlflow.db'}",
               "--artifacts-destination", str(store / "artifacts")]
    # no job-execution workers and one web worker: ~0.5 GB instead of ~2.7 GB (STACK.md)
    env = os.environ | {"MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false", "MLFLOW_DISABLE_TELEMETRY": "true"}
    return command, env, store


def _prefect_server() -> tuple[list[str], dict[str, str], Path]:
    command = [str(executable("prefect")), "server", "start", "--host", HOST, "--port", str(port("PREFECT_PORT")),
               "--analytics-off"]
    # The UI's pages call the API at PREFECT_SERVER_UI_API_URL, which is 127.0.0.1:4200 whatever --port says: set
    # it, or a UI on another port shows "Can't connect to Server API". No Prefect Cloud banners in a team's UI.
    api = f"http://{HOST}:{port('PREFECT_PORT')}/api"
    env = {k: v for k, v in os.environ.items() if k != "PREFECT_API_URL"} | {
        "PREFECT_HOME": str(state_dir() / "prefect"), "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
        "PREFECT_SERVER_UI_API_URL": api, "PREFECT_SERVER_UI_SHOW_PROMOTIONAL_CONTENT": "false"}
    return command, env, state_dir()


def _ensure_ray_token(path: Path) -> None:
    """The head runs with token auth (its internal ports listen on every interface): a random token, mode 0600."""
    if path.exists() and path.read_text().strip():
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    with os.fdopen(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600), "w") as out:
        out.write(secrets.token_hex(32))


def _ray_client_env(head: int) -> dict[str, str]:
    """What a process needs to attach to the running head: its address, and its token (an explicit address never
    turns token auth on by itself)."""
    token_path = _environ(head).get("RAY_AUTH_TOKEN_PATH") or str(ray_token_path())
    return {"RAY_ADDRESS": ray_address(head), "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN_PATH": token_path}


def _ray() -> tuple[list[str], dict[str, str], Path]:
    temp = state_dir() / "ray"
    if len(str(temp).encode()) + RAY_SOCKET_SUFFIX_BYTES > 107:
        raise ServiceError(f"Ray's socket paths under {temp} would exceed 107 bytes; "
                           f"set INSTRUCTFLOW_STATE_DIR to a shorter path")
    temp.mkdir(parents=True, exist_ok=True)
    _ensure_ray_token(ray_token_path())
    command = [str(executable("ray")), "start", "--head", "--block", "--node-ip-address", HOST,
               "--port", str(port("RAY_PORT")), "--dashboard-host", HOST,
               "--dashboard-port", str(port("RAY_DASHBOARD_PORT")),
               "--ray-client-server-port", str(port("RAY_CLIENT_SERVER_PORT")),
               "--temp-dir", str(temp), "--disable-usage-stats"]
    # The head takes the machine's default node address (what a separately started client also assumes) and no
    # RAY_ADDRESS of the caller's; on SIGTERM it tears down at once instead of draining for 30 s.
    inherited = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER")}
    env = inherited | {"RAY_USAGE_STATS_ENABLED": "0", "RAY_AUTH_MODE": "token",
                       "RAY_AUTH_TOKEN_PATH": str(ray_token_path()), "RAY_TMPDIR": str(temp),
                       "RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S": "0"}
    return command, env, temp


def _worker_environment() -> dict[str, str]:
    """The caller's environment pointed at our servers: every flow run the worker starts inherits it."""
    server = running("prefect-server")
    if server is None:
        raise ServiceError("the Prefect worker needs the Prefect server: start prefect-server first")
    env = os.environ | {"PREFECT_API_URL": f"{url('prefect-server', server)}/api",
                        "PREFECT_HOME": str(state_dir() / "prefect"), "INSTRUCTFLOW_STATE_DIR": str(state_dir())}
    if (mlflow := running("mlflow")) is not None:
        env["MLFLOW_TRACKING_URI"] = url("mlflow", mlflow)
    if (ray := running("ray")) is not None:
        env.pop("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", None)
        env |= _ray_client_env(ray)
    return env


def _ensure_work_pool(env: dict[str, str]) -> None:
    """Create the process work pool unless the server has it (the CLI fills in the process worker's job template)."""
    pool = work_pool()
    status, _ = _request(f"{env['PREFECT_API_URL']}/work_pools/{urllib.parse.quote(pool)}")
    if status == 200:
        return
    done = subprocess.run([str(executable("prefect")), "work-pool", "create", pool, "--type", "process"], env=env,
                          cwd=CHECKOUT, stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=300)
    output = done.stdout + done.stderr
    if done.returncode != 0 and "already exists" not in output:
        last = [line for line in output.splitlines() if line.strip()][-1:] or ["no output"]
        raise ServiceError(f"could not create the work pool {pool!r} (INSTRUCTFLOW_WORK_POOL): {last[0].strip()}")
    say(f"prefect-worker: work pool {pool!r} (process) ready")


def _prefect_worker() -> tuple[list[str], dict[str, str], Path]:
    env = _worker_environment()
    _ensure_work_pool(env)
    # a fresh name per start: the pool's ONLINE entry is then this process's, not one left by an earlier worker
    name = f"instructflow-{secrets.token_hex(4)}"
    command = [str(executable("prefect")), "worker", "start", "--pool", work_pool(), "--type", "process",
               "--name", name]
    return command, env, CHECKOUT


LAUNCHERS = {"mlflow": _mlflow, "prefect-server": _prefect_server, "ray": _ray, "prefect-worker": _prefect_worker}


def _check_ports(names: list[str]) -> None:
    """Every port the not-yet-running services need is free: a clear error before anything starts."""
    taken: dict[int, str] = {}
    for name in names:
        for variable in PORT_VARIABLES[name]:
            number = port(variable)
            if number in taken:
                raise ServiceError(f"{variable} and {taken[number]} are both {number}; give each service its own port")
            taken[number] = variable
            if port_in_use(number):
                raise ServiceError(f"{TITLES[name]}: {HOST}:{number} is in use by another process; "
                                   f"stop it or set {variable}")


def _warn_if_stale_worker(pid: int) -> None:
    """A worker started before Ray (or before a restart on other ports) hands its flow runs the old addresses."""
    current = _environ(pid)
    if (ray := running("ray")) is not None and current.get("RAY_ADDRESS") != ray_address(ray):
        say("prefect-worker: warning: it was started without this Ray head's RAY_ADDRESS, so its flow runs do not "
            "use it; restart it: python -m infra.services down prefect-worker, then up again")


def _start(name: str) -> str:
    if name == "labelstudio":
        found = _labelstudio_running()
        if found is None:
            _check_ports([name])
            done = _labelstudio("start")
            for line in done.stdout.splitlines():
                print(line, flush=True)
            if done.returncode != 0:
                raise _labelstudio_error(done, "start")
            found = _labelstudio_running()
            if found is None:
                raise _labelstudio_error(done, "start")
        else:
            say(f"labelstudio: already running at {found[1]} (pid {found[0]})")
        return found[1]
    pid = _recorded_pid(name)
    if pid is not None:
        say(f"{name}: already running at {url(name, pid)} (pid {pid})")
        if name == "prefect-worker":
            _warn_if_stale_worker(pid)
        return url(name, pid)
    _check_ports([name])
    command, env, cwd = LAUNCHERS[name]()
    pid = _launch(name, command, env, cwd)
    say(f"{name}: running at {url(name, pid)} (pid {pid})")
    return url(name, pid)


# --- endpoints.json ------------------------------------------------------------------------------------------------

def endpoints() -> dict:
    """What runs now, in the shape tasks/settings.py reads: the clients' variables plus the UIs' URLs."""
    found, urls = {}, {}
    if (pid := running("prefect-server")) is not None:
        found["PREFECT_API_URL"] = f"{url('prefect-server', pid)}/api"
        urls["prefect"] = url("prefect-server", pid)
    if (pid := running("mlflow")) is not None:
        found["MLFLOW_TRACKING_URI"] = urls["mlflow"] = url("mlflow", pid)
    if (pid := running("ray")) is not None:
        found["RAY_ADDRESS"] = ray_address(pid)
        urls["ray_dashboard"] = url("ray", pid)
    if (labelstudio := _labelstudio_running()) is not None:
        urls["labelstudio"] = labelstudio[1]
    return found | {"urls": urls}


def _write_endpoints() -> None:
    """endpoints.json for what runs (written whole, then renamed: a reader never sees half of it); none: removed."""
    found = endpoints()
    path = endpoints_file()
    if not found["urls"]:
        path.unlink(missing_ok=True)
        return
    partial = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    partial.write_text(json.dumps(found, indent=2) + "\n")
    partial.replace(path)


# --- the API -------------------------------------------------------------------------------------------------------

@contextlib.contextmanager
def _lock():
    """One up/down/start/stop at a time per state dir: a second `make up` waits, then finds everything running."""
    services_dir().mkdir(parents=True, exist_ok=True)
    with open(services_dir() / "lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        yield


def _select(names: list[str] | None, ray: bool = False) -> list[str]:
    wanted = set(DEFAULT_SERVICES if names is None else names) | ({"ray"} if ray else set())
    unknown = sorted(wanted - set(ORDER))
    if unknown:
        raise ServiceError(f"unknown service {unknown[0]!r}; the services are {', '.join(ORDER)}")
    return [name for name in ORDER if name in wanted]


def start(name: str) -> str:
    """Start one service unless it runs (the Prefect worker needs the server); returns its URL."""
    [name] = _select([name])
    with _lock():
        return _start(name)


def stop(name: str) -> None:
    """Stop one service and everything it started; endpoints.json is left alone (a stopped server is an outage)."""
    [name] = _select([name])
    with _lock():
        _stop(name)


def up(names: list[str] | None = None, ray: bool = False) -> dict[str, str]:
    """Start the services that do not run yet (default: all but Ray; `ray=True` adds the Ray head), wait until each
    is healthy, write endpoints.json; returns service name -> URL (the Ray head's is its dashboard)."""
    wanted = _select(names, ray)
    with _lock():
        services_dir().mkdir(parents=True, exist_ok=True)
        _check_ports([name for name in wanted if running(name) is None])
        try:
            return {name: _start(name) for name in wanted}
        finally:  # after a failed start too: the file then names what does run
            _write_endpoints()


def _stop(name: str) -> None:
    if name == "labelstudio":
        found = _labelstudio_running()
        if found is None:
            return
        began = time.monotonic()
        family = _family(found[0])
        done = _labelstudio("stop")
        if done.returncode != 0:
            raise _labelstudio_error(done, "stop")
        _terminate(found[0], STOP_TIMEOUT_S[name], family)  # whatever left its process group
        say(f"labelstudio: stopped (pid {found[0]}, {time.monotonic() - began:.1f} s)")
        return
    pid = _recorded_pid(name)
    if pid is None:
        return
    began = time.monotonic()
    _terminate(pid, STOP_TIMEOUT_S[name])
    pid_file(name).unlink(missing_ok=True)
    say(f"{name}: stopped (pid {pid}, {time.monotonic() - began:.1f} s)")


def down(names: list[str] | None = None) -> None:
    """Stop the services (default: all, Ray included) in reverse start order, with everything they started.

    endpoints.json is removed when nothing runs any more, else rewritten for what still runs.
    """
    wanted = ORDER if names is None else _select(names)
    with _lock():
        for name in reversed(ORDER):
            if name in wanted:
                _stop(name)
        _write_endpoints()


def status() -> dict[str, dict]:
    """Every service: {"running", "pid", "url", "healthy"}."""
    report = {}
    for name in ORDER:
        pid = running(name)
        report[name] = {"running": pid is not None, "pid": pid, "url": url(name, pid),
                        "healthy": pid is not None and healthy(name, pid)}
    return report


# --- the command line ----------------------------------------------------------------------------------------------

def _print_summary() -> None:
    found = endpoints()
    labels = {"mlflow": "MLflow", "prefect": "Prefect", "labelstudio": "Label Studio", "ray_dashboard": "Ray dashboard"}
    for key, label in labels.items():
        if key in found["urls"]:
            print(f"{label + ':':<15} {found['urls'][key]}")
    if "labelstudio" in found["urls"]:
        print(f"Label Studio login: the admin account in {labelstudio_credentials()}")
    clients = {k: found[k] for k in ("PREFECT_API_URL", "MLFLOW_TRACKING_URI") if k in found}
    if (ray := running("ray")) is not None:
        clients |= _ray_client_env(ray)
    if clients:
        print("export " + " ".join(f"{k}={shlex.quote(v)}" for k, v in clients.items()))


def _print_status(requested: list[str]) -> int:
    report = status()
    shown = [name for name in ORDER if name in requested or report[name]["running"]]
    width = max(len(report[name]["url"]) for name in shown)
    for name in shown:
        entry = report[name]
        state = "running" if entry["running"] else "stopped"
        pid = f"pid {entry['pid']}" if entry["pid"] else "-"
        health = ("healthy" if entry["healthy"] else "unhealthy") if entry["running"] else "-"
        print(f"{name:<15} {state:<8} {pid:<10} {entry['url']:<{width}} {health}")
    return 0 if all(report[name]["running"] for name in requested) else 3


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m infra.services",
                                     description="Start, stop and report on instructflow's local servers.")
    parser.add_argument("command", choices=["up", "down", "status"])
    parser.add_argument("services", nargs="*", metavar="SERVICE", help=f"some of: {', '.join(ORDER)} (default: all)")
    parser.add_argument("--ray", action="store_true", help="also the Ray head (up, status)")
    args = parser.parse_args(argv)
    try:
        if args.command == "up":
            up(args.services or None, ray=args.ray)
            _print_summary()
        elif args.command == "down":
            down(args.services or None)
        else:
            return _print_status(_select(args.services or None, args.ray))
    except ServiceError as error:
        for line in error.log_tail.splitlines():
            print(f"  | {line}", file=sys.stderr)
        print(f"services: error: {error}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("services: error: interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
