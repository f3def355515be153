"""`make up` / `make status` / `make down` (infra/services.py) with real servers on free loopback ports.

The module starts every service once through the command line (`python -m infra.services up --ray`) in a fresh state
dir with a short path (Ray's socket paths must fit in 107 bytes); Label Studio starts from the migrated template,
so it does not pay its first-start migration. The fixture's teardown runs `down`, then kills anything that still
mentions the state dir, so a failing test leaves no server behind.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
from pathlib import Path

import psutil
import pytest

from infra import services
from labelstudio_server import free_port, labelstudio_template, server_from_template  # noqa: F401 (fixture)

CHECKOUT = Path(services.__file__).resolve().parents[1]
PORT_VARIABLES = ["MLFLOW_PORT", "PREFECT_PORT", "LABEL_STUDIO_PORT", "RAY_PORT", "RAY_DASHBOARD_PORT",
                  "RAY_CLIENT_SERVER_PORT"]
# Set in this test process for the session's embedded services: the servers must not inherit them.
EMBEDDED = ("PREFECT_HOME", "PREFECT_API_URL", "MLFLOW_TRACKING_URI", "RAY_TMPDIR", "RAY_AUTH_TOKEN_PATH", "RAY_ADDRESS",
            "RAY_AUTH_MODE", "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "LABEL_STUDIO_URL", "LABEL_STUDIO_API_KEY")


def short_state_dir() -> Path:
    return Path(tempfile.mkdtemp(prefix="ifsv-", dir="/tmp"))


def isolate(env: pytest.MonkeyPatch, state: Path) -> dict[str, int]:
    """Point infra.services at `state`, on distinct free ports; returns the ports."""
    for name in EMBEDDED:
        env.delenv(name, raising=False)
    env.setenv("INSTRUCTFLOW_STATE_DIR", str(state))
    env.setenv("INSTRUCTFLOW_WORK_POOL", "services-test")
    ports: dict[str, int] = {}
    while len(ports) < len(PORT_VARIABLES):
        number = free_port()
        if number not in ports.values():
            ports[PORT_VARIABLES[len(ports)]] = number
    for variable, number in ports.items():
        env.setenv(variable, str(number))
    return ports


def processes_of(state: Path) -> dict[int, int]:
    """pid -> parent pid of every live process whose command line or environment mentions the state dir."""
    found = {}
    needle = str(state)
    for pid in psutil.pids():
        if pid == os.getpid():
            continue
        with contextlib.suppress(psutil.Error, OSError):  # gone since listed, a zombie, or not ours to read
            process = psutil.Process(pid)
            with process.oneshot():
                if process.status() == psutil.STATUS_ZOMBIE:
                    continue
                parent = process.ppid()
                text = "\0".join([*process.cmdline(), *(f"{k}={v}" for k, v in process.environ().items())])
            if needle in text:
                found[pid] = parent
    return found


def roots(processes: dict[int, int]) -> set[int]:
    """The processes whose parent is not among them: the services' leaders (a duplicate start would add one)."""
    return {pid for pid, parent in processes.items() if parent not in processes}


def kill_leftovers(state: Path) -> None:
    for pid in processes_of(state):
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)


def cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "infra.services", *args], cwd=CHECKOUT, env=dict(os.environ),
                          capture_output=True, text=True, timeout=600)


def recorded_pids(state: Path) -> dict[str, int]:
    return {path.stem: int(path.read_text().split()[0]) for path in (state / "services").glob("*.pid")}


# --- mechanisms, without servers ----------------------------------------------------------------------------------

def test_stop_reaches_descendants_that_left_the_group_and_ignore_sigterm():
    """A child in a session of its own (as Prefect starts flow runs) that ignores SIGTERM still goes: SIGKILL."""
    code = ("import subprocess, sys, time\n"
            "child = subprocess.Popen([sys.executable, '-c', 'import signal, time; "
            "signal.signal(signal.SIGTERM, signal.SIG_IGN); print(1, flush=True); time.sleep(600)'], "
            "start_new_session=True, stdout=subprocess.PIPE)\n"
            "child.stdout.readline()\n"
            "print(child.pid, flush=True)\n"
            "time.sleep(600)\n")
    leader = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True, start_new_session=True)
    child = int(leader.stdout.readline())
    try:
        assert os.getpgid(child) != leader.pid
        services._terminate(leader.pid, timeout_s=1.0)
        assert leader.wait(timeout=10) is not None
        assert not services.alive(child)
    finally:
        for pid in (leader.pid, child):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)


def test_a_busy_port_is_a_clear_error_and_nothing_starts(monkeypatch):
    state = short_state_dir()
    try:
        ports = isolate(monkeypatch, state)
        with socket.socket() as squatter:
            squatter.bind(("127.0.0.1", ports["MLFLOW_PORT"]))
            squatter.listen()
            with pytest.raises(services.ServiceError) as failure:
                services.up(["mlflow", "prefect-server", "prefect-worker"])
            message = str(failure.value)
            assert f"127.0.0.1:{ports['MLFLOW_PORT']}" in message and "MLFLOW_PORT" in message, message

            done = cli("up")
            assert done.returncode == 1, done.stdout + done.stderr
            assert done.stderr.strip().splitlines() == [f"services: error: {message}"], done.stderr
        assert processes_of(state) == {}
        assert recorded_pids(state) == {}
        assert not (state / "services" / "endpoints.json").exists()
        nothing = cli("down")  # nothing runs: fine
        assert nothing.returncode == 0, nothing.stdout + nothing.stderr
    finally:
        kill_leftovers(state)
        shutil.rmtree(state, ignore_errors=True)


# --- the real servers -----------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def stack(labelstudio_template):
    """Every service, Ray included, started by `python -m infra.services up --ray`; down (and made sure) at the end."""
    state = short_state_dir()
    server_from_template(labelstudio_template, state)
    with pytest.MonkeyPatch.context() as env:
        ports = isolate(env, state)
        try:
            started = cli("up", "--ray")
            assert started.returncode == 0, started.stdout + started.stderr
            yield {"state": state, "ports": ports, "output": started.stdout + started.stderr}
        finally:
            try:
                services.down()
            finally:
                kill_leftovers(state)
                shutil.rmtree(state, ignore_errors=True)


def test_up_starts_every_service_healthy_and_says_where(stack):
    state, ports, output = stack["state"], stack["ports"], stack["output"]
    mlflow, prefect = f"http://127.0.0.1:{ports['MLFLOW_PORT']}", f"http://127.0.0.1:{ports['PREFECT_PORT']}"
    labelstudio, dashboard = (f"http://127.0.0.1:{ports['LABEL_STUDIO_PORT']}",
                              f"http://127.0.0.1:{ports['RAY_DASHBOARD_PORT']}")
    printed = [line.split() for line in output.splitlines()]
    for words in (["MLflow:", mlflow], ["Prefect:", prefect], ["Label", "Studio:", labelstudio],
                  ["Ray", "dashboard:", dashboard],
                  f"Label Studio login: the admin account in {state / 'labelstudio' / 'credentials.json'}".split()):
        assert words in printed, output
    assert f"export PREFECT_API_URL={prefect}/api MLFLOW_TRACKING_URI={mlflow} " in output, output

    endpoints = json.loads((state / "services" / "endpoints.json").read_text())
    assert endpoints == {
        "PREFECT_API_URL": f"{prefect}/api", "MLFLOW_TRACKING_URI": mlflow,
        "RAY_ADDRESS": f"127.0.0.1:{ports['RAY_PORT']}",
        "urls": {"prefect": prefect, "mlflow": mlflow, "ray_dashboard": dashboard, "labelstudio": labelstudio},
    }
    report = services.status()
    assert all(entry["running"] and entry["healthy"] for entry in report.values()), report
    assert set(recorded_pids(state)) == {"mlflow", "prefect-server", "ray", "prefect-worker"}

    listed = cli("status", "--ray")
    assert listed.returncode == 0, listed.stdout + listed.stderr
    lines = listed.stdout.splitlines()
    assert len(lines) == 5 and all(" running " in line and line.endswith("healthy") for line in lines), lines

    # the worker (and so every flow run) points at these servers
    worker = psutil.Process(report["prefect-worker"]["pid"]).environ()
    for variable, value in (("PREFECT_API_URL", f"{prefect}/api"), ("MLFLOW_TRACKING_URI", mlflow),
                            ("INSTRUCTFLOW_STATE_DIR", str(state)), ("RAY_ADDRESS", endpoints["RAY_ADDRESS"]),
                            ("RAY_AUTH_MODE", "token")):
        assert worker.get(variable) == value, variable

    # no password or token in anything printed or logged here
    admin = json.loads((state / "labelstudio" / "credentials.json").read_text())
    secrets = [admin["password"], admin["token"], (state / "ray" / "auth_token").read_text().strip()]
    written = output + listed.stdout + "".join(p.read_text(errors="replace") for p in (state / "services").glob("*"))
    assert not [secret for secret in secrets if secret in written]


def test_up_again_starts_nothing(stack):
    state = stack["state"]
    pids, leaders = recorded_pids(state), roots(processes_of(state))
    urls = services.up(ray=True)
    assert urls["mlflow"] == f"http://127.0.0.1:{stack['ports']['MLFLOW_PORT']}"
    assert set(urls) == {"mlflow", "prefect-server", "ray", "prefect-worker", "labelstudio"}
    assert recorded_pids(state) == pids
    assert roots(processes_of(state)) == leaders


def test_the_ray_head_answers_with_its_token(stack):
    address = json.loads((stack["state"] / "services" / "endpoints.json").read_text())["RAY_ADDRESS"]
    env = dict(os.environ, RAY_AUTH_MODE="token", RAY_AUTH_TOKEN_PATH=str(stack["state"] / "ray" / "auth_token"))
    done = subprocess.run([str(Path(sys.executable).parent / "ray"), "status", "--address", address], env=env,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0 and "Resources" in done.stdout, done.stdout + done.stderr


def test_a_stopped_service_comes_back_with_up(stack):
    """An outage: `stop` leaves endpoints.json as it was; `up` restarts only what is missing (here the worker, which
    starts in seconds; a server goes the same way)."""
    state = stack["state"]
    before = recorded_pids(state)
    endpoints = (state / "services" / "endpoints.json").read_text()
    family = services._family(before["prefect-worker"])
    services.stop("prefect-worker")
    assert services._still_running(family) == {}
    assert not services.status()["prefect-worker"]["running"]
    assert (state / "services" / "endpoints.json").read_text() == endpoints

    services.up(["mlflow", "prefect-server", "prefect-worker"])
    after = recorded_pids(state)
    assert after["prefect-worker"] != before["prefect-worker"] and services.status()["prefect-worker"]["healthy"]
    unchanged = {"mlflow", "prefect-server", "ray"}
    assert {k: after[k] for k in unchanged} == {k: before[k] for k in unchanged}
    assert (state / "services" / "endpoints.json").read_text() == endpoints


def test_down_leaves_nothing_running(stack):
    state = stack["state"]
    report = services.status()
    families = {pid: started for entry in report.values() for pid, started in services._family(entry["pid"]).items()}
    assert len(families) > len(report)  # the servers' own children (uvicorn, Ray's raylet and GCS, ...) are in it

    done = cli("down")
    assert done.returncode == 0, done.stdout + done.stderr
    assert services._still_running(families) == {}
    assert processes_of(state) == {}
    assert recorded_pids(state) == {}
    assert not (state / "services" / "endpoints.json").exists()
    assert cli("status").returncode == 3
