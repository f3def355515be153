"""`mlflow models serve` serves the registered chat policy: the README's requests get the in-process replies.

A tiny random-weight policy is registered like the rlhf flow registers one, an alias is set, and the real
`mlflow models serve --env-manager local` runs as a subprocess against the session's embedded store.
Replies are compared at temperature 0 (greedy) or with a fixed seed, so they are deterministic.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest
from test_chat import tiny_chat_model

MODEL_NAME = "chat-serve-test"  # not "policy": the feedback-loop tests count that model's versions
ALIAS = "champion"
PROMPTS = ["What is 2+3?", "Uppercase: dog"]
GREEDY = {"max_new_tokens": 8, "temperature": 0}
SAMPLED = {"max_new_tokens": 8, "temperature": 1.0, "top_p": 0.9, "seed": 1}
LOCAL = urllib.request.build_opener(urllib.request.ProxyHandler({}))  # never send 127.0.0.1 through a proxy


@pytest.fixture(scope="module")
def policy_uri(tmp_path_factory) -> str:
    """models:/NAME@ALIAS of a tiny chat policy registered through tracking.register_chat_model."""
    from model.checkpoint import save_checkpoint
    from tasks import tracking

    out = tmp_path_factory.mktemp("served-policy")
    model, tokenizer = tiny_chat_model()
    save_checkpoint(model, out / "policy")
    tokenizer.save(out / "tokenizer.json")
    run_id = tracking.start_pipeline_run("chat-serve-test", {})
    version = tracking.register_chat_model(run_id, MODEL_NAME, out / "policy", out / "tokenizer.json")
    tracking.set_alias(MODEL_NAME, ALIAS, version)
    return f"models:/{MODEL_NAME}@{ALIAS}"


@pytest.fixture(scope="module")
def in_process(policy_uri, one_thread):
    import mlflow

    return mlflow.pyfunc.load_model(policy_uri)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    return True


@pytest.fixture(scope="module")
def server(policy_uri, tmp_path_factory) -> str:
    """Base URL of `mlflow models serve` for the policy; the server and its uvicorn child are stopped afterwards."""
    from tasks.settings import mlflow_tracking_uri

    venv_bin = Path(sys.executable).parent  # `mlflow models serve` starts `uvicorn` from PATH
    env = {**os.environ, "PATH": f"{venv_bin}{os.pathsep}{os.environ.get('PATH', '')}",
           "MLFLOW_TRACKING_URI": mlflow_tracking_uri(), "MLFLOW_DISABLE_TELEMETRY": "true",
           "OMP_NUM_THREADS": "1"}  # one thread, like the in-process model: same float sums, same tokens
    port = _free_port()
    log_path = tmp_path_factory.mktemp("serve") / "serve.log"
    with open(log_path, "wb") as log:
        process = subprocess.Popen(
            [str(venv_bin / "mlflow"), "models", "serve", "-m", policy_uri, "--env-manager", "local",
             "--host", "127.0.0.1", "-p", str(port)],
            env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        while True:
            assert process.poll() is None, f"the server exited ({process.returncode}):\n{log_path.read_text()[-3000:]}"
            assert time.monotonic() < deadline, f"no /ping answer in 120 s:\n{log_path.read_text()[-3000:]}"
            try:
                with LOCAL.open(f"{url}/ping", timeout=2) as response:
                    if response.status == 200:
                        break
            except OSError:  # not listening yet (URLError is an OSError)
                time.sleep(0.5)
        yield url
    finally:
        # start_new_session made the server's pid its process group: one signal reaches mlflow and uvicorn
        try:
            os.killpg(process.pid, signal.SIGTERM)
            process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait(timeout=20)
        except ProcessLookupError:
            pass
        deadline = time.monotonic() + 20
        while _group_alive(process.pid) and time.monotonic() < deadline:
            time.sleep(0.2)
        assert not _group_alive(process.pid), f"serve processes left in group {process.pid}"


def invoke(url: str, body) -> tuple[int, object]:
    """POST a JSON body to /invocations: (HTTP status, decoded JSON answer), error statuses included."""
    request = urllib.request.Request(f"{url}/invocations", data=json.dumps(body).encode(),
                                     headers={"Content-Type": "application/json"})
    try:
        with LOCAL.open(request, timeout=60) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


def test_the_logged_model_declares_its_params_and_an_example(policy_uri):
    import mlflow

    from tasks.chat_model import DEFAULT_PARAMS

    info = mlflow.models.get_model_info(policy_uri)
    declared = {p.name: p.default for p in info.signature.params.params}
    assert declared == DEFAULT_PARAMS  # undeclared params would be dropped from served requests
    assert info.saved_input_example_info is not None


def test_served_replies_are_the_in_process_replies(server, in_process):
    for params in (GREEDY, SAMPLED):
        expected = in_process.predict(PROMPTS, params=params)
        assert len(expected) == len(PROMPTS) and all(expected)
        assert invoke(server, {"inputs": PROMPTS, "params": params}) == (200, {"predictions": expected})
        table = {"columns": ["prompt"], "data": [[p] for p in PROMPTS]}
        assert invoke(server, {"dataframe_split": table, "params": params}) == (200, {"predictions": expected})


def test_request_params_change_the_reply(server):
    def reply(**params) -> str:
        status, answer = invoke(server, {"inputs": PROMPTS[:1], "params": params})
        assert status == 200, answer
        return answer["predictions"][0]

    assert len(reply(max_new_tokens=1, temperature=0)) < len(reply(max_new_tokens=16, temperature=0))
    assert reply(**GREEDY) != reply(**SAMPLED)
    assert reply(**SAMPLED) != reply(**{**SAMPLED, "seed": 2})
    assert reply(**SAMPLED) == reply(**SAMPLED)


def test_a_malformed_request_is_a_400_that_says_what_is_wrong(server, in_process):
    too_long = "the cat sat on the mat " * 20  # well over the 64-token context
    cases = [
        ({"inputs": []}, "missing inputs"),
        ({"inputs": [too_long]}, "shorten it"),
        ({"inputs": PROMPTS, "params": {"temperature": -1}}, "temperature must be >= 0"),
        ({"inputs": PROMPTS, "params": {"max_new_tokens": 0}}, "max_new_tokens must be at least 1"),
        ({"inputs": PROMPTS, "params": {"max_new_tokens": "many"}}, "max_new_tokens"),
    ]
    for body, reason in cases:
        status, answer = invoke(server, body)
        assert status == 400 and answer["error_code"] == "INVALID_PARAMETER_VALUE", (body, status, answer)
        assert reason in answer["message"], (body, answer)

    from mlflow.exceptions import MlflowException

    with pytest.raises(MlflowException, match="shorten it"):  # the same error in-process
        in_process.predict([too_long], params=GREEDY)
