"""The local Label Studio server (infra/labelstudio/) and tasks/labelstudio.py, against real servers."""

from __future__ import annotations

import socket
import stat

import psutil
import pytest
from label_studio_sdk import LabelStudio

from labelstudio_server import (  # noqa: F401 (fixtures)
    Server,
    free_port,
    labelstudio_server,
    labelstudio_template,
    server_from_template,
)
from model.errors import InstructflowError
from tasks import labelstudio

RANKING = """<View>
  <Text name="prompt" value="$prompt"/>
  <List name="candidates" value="$candidates" title="Responses"/>
  <Ranker name="rank" toName="candidates"/>
</View>"""


def ranking_task(prompt: str) -> dict:
    return {"prompt": prompt, "candidates": [{"id": c, "title": c, "body": f"{prompt} {c}"} for c in ("a", "b", "c")]}


def ranked(*ids: str) -> list[dict]:
    return [{"type": "ranker", "from_name": "rank", "to_name": "candidates", "value": {"ranker": {"rank": list(ids)}}}]


def servers_on(server: Server) -> list[int]:
    """Pids of the label-studio processes serving this server's data dir."""
    data = str(server.dir / "data")
    pids = []
    for process in psutil.process_iter(["cmdline", "status"]):
        cmdline = process.info["cmdline"] or []
        if process.info["status"] != psutil.STATUS_ZOMBIE and data in cmdline and "start" in cmdline:
            pids.append(process.pid)
    return pids


@pytest.fixture(scope="module")
def shared_server(labelstudio_template, tmp_path_factory):
    """One server for the tests that only add their own projects (saves a start each)."""
    server = server_from_template(labelstudio_template, tmp_path_factory.mktemp("labelstudio"))
    try:
        yield server.start()
    finally:
        server.stop()


@pytest.fixture
def use_server(monkeypatch):
    """Points tasks.labelstudio at a running server as an existing instance (LABEL_STUDIO_URL + _API_KEY)."""

    def use(server: Server) -> LabelStudio:
        monkeypatch.setenv("LABEL_STUDIO_URL", server.url)
        monkeypatch.setenv("LABEL_STUDIO_API_KEY", server.credentials["token"])
        return labelstudio.client()

    return use


def test_start_is_idempotent_loopback_only_private_and_stops(labelstudio_server, labelstudio_template):
    server = labelstudio_server
    pid = server.pid
    assert servers_on(server) == [pid]

    again = server.script("start")
    assert "already running" in again.stdout and server.pid == pid
    assert servers_on(server) == [pid]  # no second server
    listening = [c.laddr for c in psutil.Process(pid).net_connections(kind="inet") if c.status == psutil.CONN_LISTEN]
    assert {(a.ip, a.port) for a in listening} == {("127.0.0.1", server.port)}
    assert f"running at {server.url} (pid {pid})" in server.script("status").stdout

    # the admin's credentials work, sit in a private file, and appear in no output or log
    admin = LabelStudio(base_url=server.url, api_key=server.credentials["token"])
    assert admin.users.whoami().email == server.credentials["email"]
    for credentials in (server.dir / "credentials.json", labelstudio_template / "labelstudio" / "credentials.json"):
        assert stat.S_IMODE(credentials.stat().st_mode) == 0o600
    secrets = (server.credentials["password"], server.credentials["token"])
    texts = [*server.outputs, (server.dir / "server.log").read_text()]  # the copied log includes the first start's
    texts += [(labelstudio_template / "first-start.txt").read_text()]
    assert "running at" in texts[0]
    assert not [s for s in secrets for text in texts if s in text]

    server.script("stop")
    assert not servers_on(server) and not (server.dir / "server.pid").exists()
    assert server.script("status", check=False).returncode == 3
    assert "not running" in server.script("stop").stdout  # stopping twice is fine


def test_start_refuses_a_busy_port(tmp_path):
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        server = Server(tmp_path, port=busy.getsockname()[1])
        refused = server.script("start", check=False)
    assert refused.returncode == 1
    assert f"port {server.port} on 127.0.0.1 is already in use" in refused.stderr
    assert server.pid is None and not servers_on(server)
    assert not (server.dir / "credentials.json").exists()


def test_find_or_create_project_matches_the_title_exactly(shared_server, use_server):
    ls = use_server(shared_server)
    longer = labelstudio.find_or_create_project("rankings v2", RANKING, ls=ls)
    # the API's title filter finds "rankings v2" too
    exact = labelstudio.find_or_create_project("rankings", RANKING, "the exact title")
    assert exact != longer
    assert labelstudio.find_or_create_project("rankings", RANKING, ls=ls) == exact
    assert labelstudio.find_or_create_project("rankings v2", RANKING, ls=ls) == longer
    titles = sorted(p.title for p in ls.projects.list() if p.title.startswith("rankings"))
    assert titles == ["rankings", "rankings v2"]
    assert ls.projects.get(exact).description == "the exact title"


def test_connection_errors_are_clear(shared_server, monkeypatch):
    monkeypatch.setenv("LABEL_STUDIO_URL", shared_server.url)
    monkeypatch.setenv("LABEL_STUDIO_API_KEY", "0" * 40)
    with pytest.raises(InstructflowError, match="refused the API key") as refused:
        labelstudio.connection()
    assert "0" * 40 not in str(refused.value)

    monkeypatch.setenv("LABEL_STUDIO_URL", f"http://127.0.0.1:{free_port()}")
    with pytest.raises(InstructflowError, match="unreachable"):
        labelstudio.connection()

    monkeypatch.delenv("LABEL_STUDIO_API_KEY")
    with pytest.raises(InstructflowError, match="set both LABEL_STUDIO_URL and LABEL_STUDIO_API_KEY"):
        labelstudio.connection()


def test_restart_on_the_same_data_dir_keeps_projects_and_tasks(labelstudio_server, use_server):
    ls = use_server(labelstudio_server)
    project = labelstudio.find_or_create_project("kept", RANKING, ls=ls)
    ls.projects.import_tasks(project, request=[ranking_task(p) for p in ("one", "two", "three")])

    labelstudio_server.script("stop")
    labelstudio_server.script("start")

    ls = labelstudio.client()
    assert labelstudio.find_or_create_project("kept", RANKING, ls=ls) == project
    assert sorted(t.data["prompt"] for t in ls.tasks.list(project=project)) == ["one", "three", "two"]


def test_local_server_starts_on_demand_and_a_labeler_annotates_as_itself(labelstudio_template, tmp_path, monkeypatch):
    server = server_from_template(labelstudio_template, tmp_path)
    for name, value in server.env.items():
        monkeypatch.setenv(name, value)
    monkeypatch.delenv("LABEL_STUDIO_URL", raising=False)
    monkeypatch.delenv("LABEL_STUDIO_API_KEY", raising=False)
    stray = {"USERNAME": "stray@example.com", "PASSWORD": "stray", "HOST": "http://stray.invalid", "PORT": "1",
             "DEBUG": "true", "CI": "true"}  # Label Studio would read each of these: the script must not pass them on
    for name, value in stray.items():
        monkeypatch.setenv(name, value)
    try:
        url, key = labelstudio.connection()  # nothing runs yet: starts the local server
        assert (url, key) == (server.url, server.credentials["token"]) and servers_on(server) == [server.pid]
        environ = psutil.Process(server.pid).environ()
        assert not [name for name, value in stray.items() if environ.get(name) == value]
        ls = labelstudio.client()
        assert [u.email for u in ls.users.list()] == [server.credentials["email"]]

        # created through the API, a user cannot log in; with a password set through the server, it can
        email, password = "labeler@instructflow.local", "correct horse battery staple"
        labeler_id = labelstudio.create_user(email, ls=ls)
        with pytest.raises(InstructflowError, match="refused the login"):
            labelstudio.user_token(url, email, password)
        assert labelstudio.create_user(email, password, ls=ls) == labeler_id
        labeler = LabelStudio(base_url=url, api_key=labelstudio.user_token(url, email, password))
        assert labeler.users.whoami().id == labeler_id
        with pytest.raises(InstructflowError, match="refused the login"):
            labelstudio.user_token(url, email, "wrong")

        project = labelstudio.find_or_create_project("ranked by a labeler", RANKING, ls=ls)
        first, second = ls.projects.import_tasks(
            project, request=[ranking_task("first"), ranking_task("second")], return_task_ids=True
        ).task_ids
        by_itself = labeler.annotations.create(id=first, result=ranked("b", "a", "c"))  # with its own token
        for_it = ls.annotations.create(id=second, result=ranked("c", "b", "a"), completed_by=labeler_id)  # admin's
        assert by_itself.completed_by == for_it.completed_by == labeler_id
        assert ls.annotations.list(id=first)[0].result[0]["value"]["ranker"]["rank"] == ["b", "a", "c"]
    finally:
        server.stop()
    assert not servers_on(server)
