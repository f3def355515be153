"""Starts, stops and reports on the local Label Studio server; run it through labelstudio.sh (any Python >= 3.10).

Everything lives in <state>/labelstudio/: data/ (the SQLite database and media), server.pid, server.log, home/ (the
server's HOME, so nothing lands in ~) and credentials.json (mode 0600: the admin's email, password and API token,
generated on the first start and never printed). The server binds 127.0.0.1 only, on LABEL_STUDIO_PORT (default 8080).

    labelstudio.sh start    start in the background and wait for /health (idempotent; first start migrates: 1-2 min)
    labelstudio.sh stop     terminate the server's process group (then kill it if it lingers)
    labelstudio.sh status   print where it runs; exit 0 when running, 3 when not
    labelstudio.sh set-password EMAIL   set a user's password, read from stdin (API-created users need it to log in)
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

CHECKOUT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(CHECKOUT))  # run as a script: the process helpers are shared with `make up` (stdlib only)
from infra.services import alive, port_in_use  # noqa: E402
STATE = Path(os.environ.get("INSTRUCTFLOW_STATE_DIR") or CHECKOUT / ".instructflow").resolve() / "labelstudio"
VENV = Path(os.environ.get("INSTRUCTFLOW_LS_VENV") or CHECKOUT / ".venv-labelstudio").resolve()
DATA = STATE / "data"
PID_FILE = STATE / "server.pid"
LOG_FILE = STATE / "server.log"
CREDENTIALS = STATE / "credentials.json"
HOST = "127.0.0.1"
START_TIMEOUT_S = float(os.environ.get("LABEL_STUDIO_START_TIMEOUT", 300))
STOP_TIMEOUT_S = 20.0


def say(message: str) -> None:
    print(f"labelstudio: {message}", flush=True)


def fail(message: str) -> None:
    print(f"labelstudio: error: {message}", file=sys.stderr, flush=True)
    sys.exit(1)


def requested_port() -> int:
    value = os.environ.get("LABEL_STUDIO_PORT") or "8080"
    if not value.isdigit() or not 0 < int(value) < 65536:
        fail(f"LABEL_STUDIO_PORT={value!r} is not a port number")
    return int(value)


# --- the server process ------------------------------------------------------------------------------------------

def is_our_server(pid: int) -> bool:
    """The pid runs label-studio on our data dir (and is not some other process that reused the number)."""
    try:
        argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except (FileNotFoundError, ProcessLookupError):
        return False
    return alive(pid) and any(a.endswith(b"label-studio") for a in argv) and str(DATA).encode() in argv


def running_pid() -> int | None:
    """The pid in the pid file when that process is our server; a stale pid file is removed."""
    try:
        pid = int(PID_FILE.read_text().split()[0])
    except (FileNotFoundError, ValueError, IndexError):
        return None
    if is_our_server(pid):
        return pid
    PID_FILE.unlink(missing_ok=True)
    return None


def listening_ports(pid: int) -> set[tuple[str, int]]:
    """(address, port) of the TCP sockets that `pid` listens on, from /proc (IPv4 only: the server binds 127.0.0.1)."""
    inodes = set()
    with contextlib.suppress(FileNotFoundError, PermissionError):
        for fd in Path(f"/proc/{pid}/fd").iterdir():
            with contextlib.suppress(OSError):
                target = os.readlink(fd)
                if target.startswith("socket:["):
                    inodes.add(target[len("socket:["):-1])
    found = set()
    with contextlib.suppress(FileNotFoundError):
        for line in Path(f"/proc/{pid}/net/tcp").read_text().splitlines()[1:]:
            fields = line.split()
            local, state, inode = fields[1], fields[3], fields[9]
            if state == "0A" and inode in inodes:  # 0A = LISTEN
                address, port = local.split(":")
                found.add((socket.inet_ntoa(bytes.fromhex(address)[::-1]), int(port, 16)))
    return found


def address(pid: int) -> str:
    ports = sorted(port for _, port in listening_ports(pid))
    return f"http://{HOST}:{ports[0]}" if ports else "(not listening yet)"


def healthy(port: int) -> bool:
    try:
        with urllib.request.urlopen(f"http://{HOST}:{port}/health", timeout=5) as response:
            return response.status == 200
    except OSError:
        return False


def terminate(pid: int) -> None:
    """SIGTERM to the server's process group, SIGKILL after STOP_TIMEOUT_S."""
    for sig, wait_s in ((signal.SIGTERM, STOP_TIMEOUT_S), (signal.SIGKILL, 5.0)):
        with contextlib.suppress(ProcessLookupError):
            os.killpg(pid, sig)  # the server leads its own session, so its group id is its pid
        deadline = time.monotonic() + wait_s
        while alive(pid) and time.monotonic() < deadline:
            time.sleep(0.2)
        if not alive(pid):
            return
    fail(f"pid {pid} survived SIGKILL")


# --- credentials -------------------------------------------------------------------------------------------------

def credentials() -> dict:
    """The admin's credentials: read from credentials.json, or generated (mode 0600) for a data dir not yet created."""
    if CREDENTIALS.exists():
        return json.loads(CREDENTIALS.read_text())
    if (DATA / "label_studio.sqlite3").exists():
        fail(f"{DATA} holds a database but {CREDENTIALS} is missing: restore the file, or delete {DATA} to start over")
    created = {
        "email": "admin@instructflow.local",
        "password": secrets.token_urlsafe(24),
        "token": secrets.token_hex(20),  # 40 characters: the longest key Label Studio's token table holds
    }
    partial = CREDENTIALS.with_suffix(".tmp")
    partial.unlink(missing_ok=True)
    with os.fdopen(os.open(partial, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600), "w") as out:
        json.dump(created, out, indent=2)
    partial.replace(CREDENTIALS)
    say(f"generated admin credentials in {CREDENTIALS}")
    return created


def server_environment() -> dict[str, str]:
    """All that Label Studio gets to see: it also reads bare USERNAME, PASSWORD, HOST, PORT, DEBUG, CI, ... if set."""
    (STATE / "home").mkdir(parents=True, exist_ok=True)
    return {
        "PATH": f"{VENV / 'bin'}:/usr/bin:/bin",
        "HOME": str(STATE / "home"),
        "LANG": "C.UTF-8",
        "PYTHONUNBUFFERED": "1",
        "LABEL_STUDIO_BASE_DATA_DIR": str(DATA),
        "DEBUG": "false",  # Label Studio defaults to Django's debug mode (tracebacks in error pages)
        "LATEST_VERSION_CHECK": "false",
        "SENTRY_DSN": "",
        "FRONTEND_SENTRY_DSN": "",
        "COLLECT_ANALYTICS": "false",
        "DISABLE_SIGNUP_WITHOUT_LINK": "true",
    }


# --- commands ----------------------------------------------------------------------------------------------------

def start() -> None:
    port = requested_port()
    pid = running_pid()
    if pid is not None:
        say(f"already running at {address(pid)} (pid {pid})")
        if (HOST, port) not in listening_ports(pid):
            print(f"labelstudio: warning: LABEL_STUDIO_PORT={port} ignored; stop the server to move it",
                  file=sys.stderr)
        return
    if port_in_use(port):
        fail(f"port {port} on {HOST} is already in use; set LABEL_STUDIO_PORT to a free port")
    label_studio = VENV / "bin" / "label-studio"
    if not label_studio.exists():
        fail(f"{label_studio} not found: run infra/labelstudio/install.sh first")

    admin = credentials()
    DATA.mkdir(parents=True, exist_ok=True)
    database, template = DATA / "label_studio.sqlite3", VENV / "instructflow-migrated.sqlite3"
    if not database.exists() and template.is_file():  # a new data dir: start from the migrated empty database
        staging = database.with_suffix(".copying")
        shutil.copyfile(template, staging)
        staging.chmod(0o600)
        staging.rename(database)
    # The password and token travel in the environment (readable by this user only), not on the command line
    # (readable by every user); they matter only on the first start, which creates the admin and its token.
    env = server_environment() | {"LABEL_STUDIO_PASSWORD": admin["password"], "LABEL_STUDIO_USER_TOKEN": admin["token"]}
    command = [
        str(label_studio), "start", "--no-browser", "--internal-host", HOST, "--port", str(port),
        "--data-dir", str(DATA), "--username", admin["email"], "--enable-legacy-api-token", "--log-level", "WARNING",
    ]
    with open(LOG_FILE, "ab") as log:
        log.write(f"\n=== {time.strftime('%Y-%m-%d %H:%M:%S')} start on {HOST}:{port}\n".encode())
        log.flush()
        server = subprocess.Popen(command, env=env, cwd=STATE, stdin=subprocess.DEVNULL, stdout=log,
                                  stderr=subprocess.STDOUT, start_new_session=True)
    PID_FILE.write_text(f"{server.pid}\n")
    say(f"starting (pid {server.pid}, log {LOG_FILE})")

    deadline = time.monotonic() + START_TIMEOUT_S
    while True:
        if server.poll() is not None:
            PID_FILE.unlink(missing_ok=True)
            fail(f"the server exited with code {server.returncode} before it was healthy; see {LOG_FILE}")
        ports = listening_ports(server.pid)
        if ports - {(HOST, port)}:
            terminate(server.pid)
            PID_FILE.unlink(missing_ok=True)
            fail(f"the server listened on {sorted(ports)} instead of {HOST}:{port} (was the port taken meanwhile?)")
        if ports and healthy(port):
            break
        if time.monotonic() > deadline:
            terminate(server.pid)
            PID_FILE.unlink(missing_ok=True)
            fail(f"no healthy server on {HOST}:{port} after {START_TIMEOUT_S:.0f} s; see {LOG_FILE}")
        time.sleep(0.5)
    say(f"running at http://{HOST}:{port} (pid {server.pid}); credentials in {CREDENTIALS}")


def stop() -> None:
    pid = running_pid()
    if pid is None:
        say("not running")
        return
    terminate(pid)
    PID_FILE.unlink(missing_ok=True)
    say(f"stopped (pid {pid})")


def status() -> None:
    pid = running_pid()
    if pid is None:
        say("not running")
        sys.exit(3)
    say(f"running at {address(pid)} (pid {pid})")


def set_password(email: str) -> None:
    """Sets a user's password from stdin: users created through the API cannot log in until this ran."""
    password = sys.stdin.readline().rstrip("\n")
    if not password:
        fail("set-password reads the new password from stdin, and got none")
    label_studio = VENV / "bin" / "label-studio"
    if not label_studio.exists():
        fail(f"{label_studio} not found: run infra/labelstudio/install.sh first")
    # `label-studio reset_password` takes --password on its command line (visible to every user) or else asks
    # getpass, which reads stdin when there is no terminal: a new session has none.
    done = subprocess.run(
        [str(label_studio), "reset_password", "--data-dir", str(DATA), "--username", email],
        input=password + "\n", env=server_environment(), cwd=STATE, capture_output=True, text=True,
        start_new_session=True,
    )
    output = done.stdout + done.stderr
    if done.returncode != 0 or not ("successfully changed" in output or "same as current" in output):
        last = output.strip().splitlines()[-1:] or ["no output"]
        fail(f"could not set the password of {email}: {last[0]}")
    say(f"password set for {email}")


def main() -> None:
    commands = {"start": start, "stop": stop, "status": status}
    if len(sys.argv) == 3 and sys.argv[1] == "set-password":
        return set_password(sys.argv[2])
    if len(sys.argv) != 2 or sys.argv[1] not in commands:
        fail(f"usage: labelstudio.sh {'|'.join(commands)} | set-password EMAIL (password on stdin)")
    STATE.mkdir(mode=0o700, parents=True, exist_ok=True)
    for folder in (STATE.parent, STATE):  # the state dir and this one: the database below holds the API token
        if folder.stat().st_uid == os.getuid():
            folder.chmod(0o700)
    if sys.argv[1] == "status":
        return status()
    with open(STATE / "server.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # one start/stop at a time; a concurrent start then finds it running
        commands[sys.argv[1]]()


if __name__ == "__main__":
    main()
