"""Label Studio access: the connection (an existing instance or the local server, started on demand), projects, users.

LABEL_STUDIO_URL + LABEL_STUDIO_API_KEY point at an existing instance. Unset, the local server runs from its own venv
(infra/labelstudio/, started here on first use) on 127.0.0.1:LABEL_STUDIO_PORT (default 8080) with its data and admin
credentials in <state>/labelstudio/. The API key is read from there or the environment, and never logged.
"""

from __future__ import annotations

import json
import os
import re
import subprocess

import httpx
from label_studio_sdk import LabelStudio
from label_studio_sdk.core.api_error import ApiError

from model.errors import InstructflowError
from tasks.settings import CHECKOUT, state_dir

SCRIPT = CHECKOUT / "infra" / "labelstudio" / "labelstudio.sh"


def connection() -> tuple[str, str]:
    """(url, api_key) of a reachable Label Studio that accepts the key, starting the local server when none is set."""
    url, key = os.environ.get("LABEL_STUDIO_URL"), os.environ.get("LABEL_STUDIO_API_KEY")
    if url or key:
        if not (url and key):
            raise InstructflowError("set both LABEL_STUDIO_URL and LABEL_STUDIO_API_KEY, or neither (the local server)")
        url = url.rstrip("/")
    else:
        url = _start_local_server()
        key = json.loads((state_dir() / "labelstudio" / "credentials.json").read_text())["token"]
    try:
        LabelStudio(base_url=url, api_key=key, timeout=30).users.whoami()
    except httpx.HTTPError as error:
        raise InstructflowError(f"Label Studio at {url} is unreachable ({error}); check LABEL_STUDIO_URL") from None
    except ApiError as error:
        raise InstructflowError(
            f"Label Studio at {url} refused the API key (HTTP {error.status_code}); check LABEL_STUDIO_API_KEY "
            "(the legacy token from Account & Settings, or a personal access token)"
        ) from None
    return url, key


def client() -> LabelStudio:
    url, key = connection()
    return LabelStudio(base_url=url, api_key=key)  # always pass base_url: the SDK's default is localhost:8000


def find_or_create_project(title: str, label_config: str, description: str = "", ls: LabelStudio | None = None,
                           instructions: str = "") -> int:
    """Id of the project titled exactly `title` (the oldest if several), else of a new one; an existing one is kept.

    `instructions` go into the project's own Instructions field, which Label Studio shows before the first task."""
    ls = ls or client()
    # the API's title filter is a substring match ("ranking" also finds "ranking v2"): compare exactly
    same = [p.id for p in ls.projects.list(title=title) if p.title == title]
    if same:
        return min(same)
    extra = {"expert_instruction": instructions, "show_instruction": True} if instructions else {}
    return ls.projects.create(title=title, label_config=label_config, description=description, **extra).id


def create_user(email: str, password: str | None = None, first_name: str = "", last_name: str = "",
                ls: LabelStudio | None = None) -> int:
    """Id of the user with this email, created if missing; with a password (local server only) it can log in."""
    ls = ls or client()
    user = next((u for u in ls.users.list() if u.email == email), None)
    if user is None:
        user = ls.users.create(username=email, email=email, first_name=first_name, last_name=last_name)
    if password is not None:
        # The API ignores a password: only the server's own `reset_password` sets one, so it needs the local data dir.
        if os.environ.get("LABEL_STUDIO_URL"):
            raise InstructflowError(
                f"cannot set the password of {email} on {os.environ['LABEL_STUDIO_URL']}: run `label-studio "
                "reset_password` on that server (passwords are set here for the local server only)"
            )
        _run_script("set-password", email, stdin=password + "\n")
    return user.id


def user_token(url: str, email: str, password: str) -> str:
    """The user's own API token (legacy token), got by logging in through the web form as that user would."""
    with httpx.Client(base_url=url, timeout=30) as web:
        web.get("/user/login/")
        response = web.post(
            "/user/login/",
            data={"email": email, "password": password, "csrfmiddlewaretoken": web.cookies.get("csrftoken", "")},
            headers={"Referer": f"{url}/user/login/"},
        )
        if response.status_code != 302:  # a failed login renders the form again (200)
            raise InstructflowError(f"Label Studio at {url} refused the login of {email}: wrong password?")
        return web.get("/api/current-user/token").raise_for_status().json()["token"]


def _start_local_server() -> str:
    """Starts the local server unless it runs (building its venv on first use) and returns its URL."""
    output = _run_script("start")
    found = re.search(r"running at (http://\S+)", output)
    if not found:
        raise InstructflowError(f"the local Label Studio did not report its address:\n{output}")
    return found.group(1)


def _run_script(*args: str, stdin: str | None = None) -> str:
    done = subprocess.run([str(SCRIPT), *args], input=stdin, capture_output=True, text=True,
                          env=os.environ | {"INSTRUCTFLOW_STATE_DIR": str(state_dir())})
    if done.returncode != 0:
        raise InstructflowError(f"infra/labelstudio/labelstudio.sh {args[0]} failed:\n{done.stdout}{done.stderr}")
    return done.stdout
