"""Real Label Studio servers for tests: a data dir migrated once per machine, copied for each server (~6 s to start).

The first start of a data dir runs Label Studio's migrations (1-2 minutes), so `labelstudio_template` migrates one
into the test cache, keyed on infra/labelstudio/requirements.txt, and every server starts from a copy of it (its admin
credentials included). Servers run through infra/labelstudio/labelstudio.sh on a free loopback port and are stopped
by pid when the test ends. Import the fixtures into a test module (or list this module in `pytest_plugins`).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import signal
import socket
import subprocess
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import psutil
import pytest

from tasks.settings import CHECKOUT, cache_dir

INFRA = CHECKOUT / "infra" / "labelstudio"
SCRIPT = INFRA / "labelstudio.sh"


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@dataclass
class Server:
    """A Label Studio server's state dir (its files in labelstudio/) and port; `script` runs labelstudio.sh on it."""

    state: Path
    port: int = field(default_factory=free_port)
    outputs: list[str] = field(default_factory=list)  # everything the script printed, to check that no secret leaked

    @property
    def dir(self) -> Path:
        return self.state / "labelstudio"

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def credentials(self) -> dict:
        return json.loads((self.dir / "credentials.json").read_text())

    @property
    def pid(self) -> int | None:
        with contextlib.suppress(FileNotFoundError):
            return int((self.dir / "server.pid").read_text())
        return None

    @property
    def env(self) -> dict[str, str]:
        """The environment of a process that uses this server as the local one."""
        env = {k: v for k, v in os.environ.items() if k not in ("LABEL_STUDIO_URL", "LABEL_STUDIO_API_KEY")}
        return env | {"INSTRUCTFLOW_STATE_DIR": str(self.state), "LABEL_STUDIO_PORT": str(self.port)}

    def script(self, command: str, check: bool = True) -> subprocess.CompletedProcess:
        done = subprocess.run([str(SCRIPT), command], env=self.env, capture_output=True, text=True, timeout=600)
        self.outputs.append(done.stdout + done.stderr)
        if check and done.returncode != 0:
            raise AssertionError(f"labelstudio.sh {command} exited {done.returncode}:\n{done.stdout}{done.stderr}")
        return done

    def start(self) -> Server:
        self.script("start")
        return self

    def stop(self) -> None:
        """Stops it through the script, then makes sure: kills the process group of the pid it ran under."""
        pid = self.pid
        self.script("stop", check=False)
        if pid is not None and _running(pid):
            with contextlib.suppress(ProcessLookupError):
                os.killpg(pid, signal.SIGKILL)


def _running(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


@pytest.fixture(scope="session")
def labelstudio_template() -> Path:
    """A state dir whose labelstudio/ holds a migrated data dir and its admin credentials (built once per machine)."""
    key = hashlib.sha256((INFRA / "requirements.txt").read_bytes()).hexdigest()[:12]
    template = cache_dir() / f"labelstudio-{key}"
    if not (template / "labelstudio" / "credentials.json").exists():
        building = Path(tempfile.mkdtemp(prefix="labelstudio-", dir=cache_dir()))
        server = Server(building)
        try:
            server.start()  # the first start: installs the venv if missing, generates credentials, migrates
        except BaseException:
            server.stop()
            shutil.rmtree(building, ignore_errors=True)
            raise
        server.stop()
        (building / "first-start.txt").write_text("\n".join(server.outputs))  # tests check it for leaked secrets
        for transient in ("server.pid", "server.lock"):
            (server.dir / transient).unlink(missing_ok=True)
        try:
            building.rename(template)
        except OSError:  # another session finished first: use its template
            shutil.rmtree(building, ignore_errors=True)
    return template


def server_from_template(template: Path, state: Path) -> Server:
    """A server (not started) whose state dir is a fresh copy of the template."""
    shutil.copytree(template / "labelstudio", state / "labelstudio")
    return Server(state)


@pytest.fixture
def labelstudio_server(labelstudio_template: Path, tmp_path: Path):
    """A running server on a copy of the migrated data dir, stopped at the end of the test."""
    server = server_from_template(labelstudio_template, tmp_path)
    try:
        yield server.start()
    finally:
        server.stop()


@pytest.fixture(scope="module")
def labelstudio_and_prefect(labelstudio_template, tmp_path_factory):
    """A Label Studio server for the module (LABEL_STUDIO_URL/API_KEY point at it) inside Prefect's test harness."""
    from prefect.testing.utilities import prefect_test_harness

    server = server_from_template(labelstudio_template, tmp_path_factory.mktemp("labelstudio")).start()
    saved = {k: os.environ.get(k) for k in ("LABEL_STUDIO_URL", "LABEL_STUDIO_API_KEY")}
    os.environ["LABEL_STUDIO_URL"], os.environ["LABEL_STUDIO_API_KEY"] = server.url, server.credentials["token"]
    try:
        with prefect_test_harness(server_startup_timeout=120):
            yield server
    finally:
        for k, v in saved.items():
            os.environ.pop(k) if v is None else os.environ.__setitem__(k, v)
        server.stop()
