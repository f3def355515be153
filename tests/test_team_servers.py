"""The team workflows against real servers, as `make up` starts them: schedule, label, inspect, survive outages.

One module-wide set of services (infra/services.py, the code behind `make up`) in its own state dir on free loopback
ports: an MLflow tracking server, a Prefect server with a process work pool and a worker, and Label Studio (started
from the migrated template). `make deploy` registers prefect.yaml's deployments; every flow run below is picked up
and run by that worker in its own process, and everything is checked through the servers' REST APIs, as a
teammate's browser or script would see it.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

from browser import chromium  # noqa: F401 (a fixture)
from infra import services
from labelstudio_server import free_port, labelstudio_template, server_from_template  # noqa: F401 (fixture)
from tasks.params import IngestParams, JudgeParams, PPOParams, PretrainParams, RankParams, RewardParams, SampleParams
from tasks.settings import CHECKOUT
from tiny_policy import write_tiny_policy

# Screenshots land in the untracked test cache; INSTRUCTFLOW_SCREENSHOT_DIR=docs/screenshots refreshes the README's.
SCREENSHOTS = Path(os.environ.get("INSTRUCTFLOW_SCREENSHOT_DIR") or CHECKOUT / ".instructflow-test" / "screenshots")
FINAL = {"COMPLETED", "FAILED", "CRASHED", "CANCELLED"}

TINY = PretrainParams(n_layer=1, n_head=2, n_embd=32, block_size=64, max_steps=30, batch_size=4, warmup_steps=5,
                      eval_every=10, checkpoint_every=10)
SAMPLE = SampleParams(n_prompts=12, k=3, max_new_tokens=6)
RANK = RankParams(project="team round", labeler="people", wait="pause", timeout_s=900, dataset="team", round="team")
REWARD = RewardParams(dataset="team", learning_rate=1e-3, batch_size=4, eval_every=2, val_fraction=0.5)
PPO = PPOParams(n_prompts=16, total_episodes=16, batch_size=8, mini_batches=2, learning_rate=1e-3, max_new_tokens=6,
                checkpoint_every=1, require_useful_reward=False)  # a random-weight policy: its RM is at chance
JUDGE = JudgeParams(n_prompts=6, max_new_tokens=6, kl_samples=2)

# What settings.apply_environment() put into this test process for its own embedded services: the servers' processes
# must not inherit them (they would share the session's Ray and MLflow files).
EMBEDDED = ("PREFECT_HOME", "PREFECT_API_URL", "MLFLOW_TRACKING_URI", "RAY_TMPDIR", "RAY_AUTH_TOKEN_PATH",
            "RAY_ADDRESS", "TORCHINDUCTOR_CACHE_DIR", "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "LABEL_STUDIO_URL",
            "LABEL_STUDIO_API_KEY")


@dataclass
class Team:
    state: Path
    prefect: httpx.Client  # base URL .../api
    mlflow: httpx.Client
    urls: dict[str, str]
    corpus: Path

    def run_deployment(self, name: str, parameters: dict) -> str:
        deployment = self.prefect.get(f"/deployments/name/{name}").raise_for_status().json()
        created = self.prefect.post(f"/deployments/{deployment['id']}/create_flow_run",
                                    json={"parameters": parameters}).raise_for_status().json()
        return created["id"]

    def wait_for(self, flow_run_id: str, states: set[str], timeout_s: float = 600) -> dict:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            run = self.prefect.get(f"/flow_runs/{flow_run_id}").raise_for_status().json()
            if run["state"]["type"] in states:
                return run
            time.sleep(2)
        raise AssertionError(f"flow run {flow_run_id} still {run['state']['type']} after {timeout_s} s:\n"
                             + self.logs(flow_run_id)[-4000:])

    def paused_subflow(self, flow_run_id: str, timeout_s: float = 600) -> dict:
        """The subflow run of `flow_run_id` that paused (the round's `rank` flow waits inside the round)."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            paused = self.prefect.post("/flow_runs/filter", json={"flow_runs": {
                "parent_flow_run_id": {"any_": [flow_run_id]},
                "state": {"type": {"any_": ["PAUSED"]}}}}).raise_for_status().json()
            if paused:
                return paused[0]
            parent = self.prefect.get(f"/flow_runs/{flow_run_id}").raise_for_status().json()
            if parent["state"]["type"] in FINAL:
                raise AssertionError(f"flow run {flow_run_id} ended {parent['state']['type']} without pausing:\n"
                                     + self.logs(flow_run_id)[-4000:])
            time.sleep(2)
        raise AssertionError(f"flow run {flow_run_id} did not pause within {timeout_s} s")

    def logs(self, flow_run_id: str) -> str:
        lines, offset = [], 0
        while True:
            page = self.prefect.post("/logs/filter", json={"logs": {"flow_run_id": {"any_": [flow_run_id]}},
                                                           "sort": "TIMESTAMP_ASC", "offset": offset,
                                                           "limit": 200}).raise_for_status().json()
            lines += [entry["message"] for entry in page]
            if len(page) < 200:
                return "\n".join(lines)
            offset += 200

    def runs(self, stage: str | None = None, key: str | None = None) -> list[dict]:
        experiment = self.mlflow.get("/api/2.0/mlflow/experiments/get-by-name",
                                     params={"experiment_name": "instructflow"}).raise_for_status().json()
        filters = [f"tags.`instructflow.stage` = '{stage}'"] if stage else []
        filters += [f"tags.`instructflow.key` = '{key}'"] if key else []
        found = self.mlflow.post("/api/2.0/mlflow/runs/search", json={
            "experiment_ids": [experiment["experiment"]["experiment_id"]], "filter": " and ".join(filters),
            "max_results": 1000}).raise_for_status().json()
        return found.get("runs", [])

    def versions(self, name: str) -> list[dict]:
        found = self.mlflow.get("/api/2.0/mlflow/model-versions/search",
                                params={"filter": f"name = '{name}'", "max_results": 1000}).raise_for_status().json()
        return found.get("model_versions", [])


def logged_steps(max_steps: int, every: int = 10) -> list[int]:
    """The steps training logs its loss at (model/train.py: the first, every `log_every`, the last)."""
    return sorted({1, max_steps, *range(every, max_steps + 1, every)})


def tags(run: dict) -> dict[str, str]:
    return {t["key"]: t["value"] for t in run["data"].get("tags", [])}


def params(model) -> dict:
    return json.loads(model.model_dump_json())


@pytest.fixture(scope="module")
def team(labelstudio_template, tiny_shakespeare):
    state = Path(tempfile.mkdtemp(prefix="if-team-"))  # short: Ray's socket paths must fit in 107 bytes
    server_from_template(labelstudio_template, state)  # a migrated Label Studio data dir: starts in seconds
    corpus = state / "corpus"
    corpus.mkdir()
    text = tiny_shakespeare.read_text(encoding="utf-8")[:200_000]
    for n in range(4):
        (corpus / f"part{n}.txt").write_text(text[n * 50_000:(n + 1) * 50_000])
    ports = {"MLFLOW_PORT": free_port(), "PREFECT_PORT": free_port(), "LABEL_STUDIO_PORT": free_port()}
    with pytest.MonkeyPatch.context() as env:
        for name in EMBEDDED:
            env.delenv(name, raising=False)
        env.setenv("INSTRUCTFLOW_STATE_DIR", str(state))
        env.setenv("INSTRUCTFLOW_WORK_POOL", "team-pool")
        env.setenv("PREFECT_WORKER_QUERY_SECONDS", "2")  # the worker polls every 10 s by default
        env.setenv("PREFECT_CLIENT_MAX_RETRIES", "2")  # a flow run that lost its server fails within seconds
        for name, port in ports.items():
            env.setenv(name, str(port))
        try:
            urls = services.up(["mlflow", "prefect-server", "prefect-worker", "labelstudio"])
            endpoints = json.loads((state / "services" / "endpoints.json").read_text())
            deploy = subprocess.run(["make", "-s", "deploy"], cwd=CHECKOUT, capture_output=True, text=True,
                                    timeout=300, env=os.environ | {"PREFECT_API_URL": endpoints["PREFECT_API_URL"]})
            assert deploy.returncode == 0, deploy.stdout + deploy.stderr
            with httpx.Client(base_url=endpoints["PREFECT_API_URL"], timeout=30) as prefect, \
                    httpx.Client(base_url=endpoints["MLFLOW_TRACKING_URI"], timeout=30) as mlflow:
                yield Team(state, prefect, mlflow, urls, corpus)
        finally:
            services.down()
            if not os.environ.get("INSTRUCTFLOW_KEEP_TEST_STATE"):
                shutil.rmtree(state, ignore_errors=True)


@pytest.fixture(scope="module")
def pipeline_run(team) -> dict:
    """The pipeline deployment, triggered with tiny parameters and run by the worker."""
    parameters = {"ingest_params": params(IngestParams(sources=[str(team.corpus)], min_chars=50, val_fraction=0.3)),
                  "tokenizer_params": {"vocab_size": 512}, "pretrain_params": params(TINY)}
    flow_run = team.run_deployment("pipeline/pipeline", parameters)
    return team.wait_for(flow_run, FINAL)


def test_make_deploy_registers_every_flow_and_the_inactive_feedback_schedule(team):
    deployments = team.prefect.post("/deployments/filter", json={}).raise_for_status().json()
    names = {d["name"] for d in deployments}
    assert {"pipeline", "pretrain", "sft", "rank", "reward", "ppo", "feedback-round"} <= names
    assert all(d["work_pool_name"] == "team-pool" for d in deployments)
    round_ = next(d for d in deployments if d["name"] == "feedback-round")
    assert [s["schedule"]["cron"] for s in round_["schedules"]] == ["0 3 * * *"]
    assert not any(s["active"] for s in round_["schedules"])  # on only with INSTRUCTFLOW_FEEDBACK_SCHEDULE=true


def test_pipeline_deployment_runs_on_the_worker_and_lands_in_mlflow(team, pipeline_run):
    assert pipeline_run["state"]["type"] == "COMPLETED", team.logs(pipeline_run["id"])[-4000:]
    assert pipeline_run["work_pool_name"] == "team-pool"
    for stage in ("ingest", "tokenizer", "pretrain"):
        [run] = team.runs(stage)
        assert run["info"]["status"] == "FINISHED"
    [pretrain] = team.runs("pretrain")
    metrics = {m["key"] for m in pretrain["data"]["metrics"]}
    assert {"pretrain/loss", "pretrain/val_loss"} <= metrics
    [version] = team.versions("pretrain")
    assert version["run_id"] == pretrain["info"]["run_id"]
    history = team.mlflow.get("/api/2.0/mlflow/metrics/get-history", params={
        "run_id": pretrain["info"]["run_id"], "metric_key": "pretrain/loss", "max_results": 1000}).json()["metrics"]
    assert sorted(m["step"] for m in history) == logged_steps(TINY.max_steps)


@pytest.fixture(scope="module")
def sft_model(team) -> tuple[str, str]:
    return write_tiny_policy(team.state / "sft")


def test_feedback_round_pauses_for_rankings_and_resumes_from_a_run_input(team, sft_model, pipeline_run, chromium):
    sft, tokenizer = sft_model
    flow_run = team.run_deployment("rlhf/feedback-round", {
        "sft_uri": sft, "tokenizer_uri": tokenizer, "sample_params": params(SAMPLE), "rank_params": params(RANK),
        "reward_params": params(REWARD), "ppo_params": params(PPO), "judge_params": params(JUDGE)})
    paused = team.paused_subflow(flow_run)  # the round's `rank` subflow, waiting for people
    assert team.prefect.get(f"/flow_runs/{flow_run}").json()["state"]["type"] == "RUNNING"

    # People rank in Label Studio while the round waits: a person ranks 8 of the 12 tasks through the API a browser
    # uses (by the gold preference, to be quick; tests/test_ranking_browser.py drags a ranking in the real UI). Their
    # rankings are not marked simulated, so the round's reward model (labeler "people") trains on them.
    with pytest.MonkeyPatch.context() as env:
        env.setenv("INSTRUCTFLOW_STATE_DIR", str(team.state))  # the module's Label Studio is this state's local one
        from tasks import labelstudio
        from tasks.feedback import gold_preference
        from tasks.ranking import export_rankings, project_levels, ranking_result, simulated_rank

        ls = labelstudio.client()
        [project] = [p for p in ls.projects.list() if p.title == RANK.project]
        person = labelstudio.create_user("person@instructflow.local", ls=ls)
        levels = project_levels(project.id, ls)
        for task in sorted(export_rankings(project.id, ls), key=lambda t: t["id"])[:8]:
            responses = [{"id": c["id"], "text": c["body"]} for c in task["data"]["candidates"]]
            tiers = simulated_rank(task["data"]["prompt"], responses, gold_preference)
            ls.annotations.create(id=task["id"], result=ranking_result(tiers, levels), completed_by=person)
    assert ls.projects.get(id=project.id).num_tasks_with_annotations == 8
    take_screenshots(chromium, team, paused["id"], project.id)
    time.sleep(12)  # longer than the round's own poll: 8 of 12 ranked must not resume it by itself
    assert team.prefect.get(f"/flow_runs/{paused['id']}").json()["state"]["type"] == "PAUSED"

    team.prefect.post(f"/flow_runs/{paused['id']}/resume",
                      json={"run_input": {"resumed_by": "person", "note": "8 ranked, enough"}}).raise_for_status()
    finished = team.wait_for(flow_run, FINAL)
    assert finished["state"]["type"] == "COMPLETED", team.logs(flow_run)[-4000:]
    assert "resumed by person (8 ranked, enough); 8 of 12 tasks ranked" in team.logs(paused["id"])
    [rlhf] = [r for r in team.runs() if tags(r).get("instructflow.flow") == "rlhf"]
    assert rlhf["info"]["status"] == "FINISHED"
    for stage in ("sample", "reward", "ppo"):
        assert [r["info"]["status"] for r in team.runs(stage)] == ["FINISHED"]
    assert len(team.versions("reward")) == 1 and len(team.versions("policy")) == 1

    # what the Prefect UI shows about the round: runs named by the round, links to MLflow and Label Studio, the
    # judged answers and the report card
    names = {r["id"]: r["name"] for r in team.prefect.post("/flow_runs/filter", json={"limit": 200}).json()}
    assert names[flow_run] == f"rlhf-{RANK.round}" and names[paused["id"]] == f"rank-{RANK.round}"
    artifacts = team.prefect.post("/artifacts/filter", json={"limit": 200}).raise_for_status().json()
    by_key = {}
    for artifact in artifacts:
        by_key.setdefault(artifact["key"], []).append(artifact)
    for stage in ("sample", "reward", "ppo", "judge"):
        [link] = [a for a in by_key[f"{stage}-mlflow-run"] if a["flow_run_id"] == flow_run]
        assert link["type"] == "markdown" and f"/#/experiments/" in link["data"]  # Prefect stores a link as markdown
    [project_link] = by_key["label-studio-project"]
    assert f"/projects/{project.id}" in project_link["data"] and project_link["flow_run_id"] == paused["id"]
    [answers] = by_key["judged-answers"]
    assert answers["type"] == "table" and "policy" in answers["data"]
    [card] = by_key["report-card"]
    assert card["type"] == "markdown" and "Wall time per stage" in card["data"] and "win rate" in card["data"]


def take_screenshots(chromium, team: Team, flow_run: str, project_id: int) -> None:
    """The three UIs a teammate opens during a feedback round, each checked for what it should show."""
    SCREENSHOTS.mkdir(parents=True, exist_ok=True)
    page = chromium.new_page(viewport={"width": 1280, "height": 760})
    try:
        page.goto(f"{team.urls['prefect-server']}/runs/flow-run/{flow_run}")
        shows(page, "Paused", "Resume", "rank")
        page.screenshot(path=str(SCREENSHOTS / "prefect-paused-round.jpg"), type="jpeg", quality=70)

        admin = json.loads((team.state / "labelstudio" / "credentials.json").read_text())
        page.goto(f"{team.urls['labelstudio']}/user/login/")
        page.fill("input[name=email]", admin["email"])
        page.fill("input[name=password]", admin["password"])
        page.click("button[type=submit]")
        page.goto(f"{team.urls['labelstudio']}/projects/{project_id}/data")
        shows(page, "team round")
        page.wait_for_load_state("networkidle")
        page.screenshot(path=str(SCREENSHOTS / "labelstudio-rankings.jpg"), type="jpeg", quality=70)

        experiment = team.mlflow.get("/api/2.0/mlflow/experiments/get-by-name",
                                     params={"experiment_name": "instructflow"}).json()["experiment"]
        page.goto(f"{team.urls['mlflow']}/#/experiments/{experiment['experiment_id']}/runs")
        shows(page, "pipeline", "rlhf")
        page.screenshot(path=str(SCREENSHOTS / "mlflow-runs.jpg"), type="jpeg", quality=70)
    finally:
        page.close()


def shows(page, *texts: str, timeout_ms: int = 60_000) -> None:
    """Wait until the page's visible text holds every one of `texts` (a screenshot of a half-loaded UI is no use);
    on a timeout, the page as it was is kept beside the screenshots for a look."""
    try:
        page.wait_for_function("texts => texts.every(t => document.body.innerText.includes(t))", arg=list(texts),
                               timeout=timeout_ms)
    except Exception:
        page.screenshot(path=str(SCREENSHOTS / "failed-page.png"))
        raise AssertionError(f"{page.url} never showed all of {texts}; it shows:\n{page.inner_text('body')[:2000]}")


def wait_for_running_stage(team: Team, stage: str, metric: str, timeout_s: float = 300) -> dict:
    """The RUNNING MLflow run of `stage` once it has logged `metric`."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        for run in team.runs(stage):
            logged = {m["key"] for m in run["data"].get("metrics", [])}
            if run["info"]["status"] == "RUNNING" and metric in logged:
                return run
        time.sleep(0.5)
    raise AssertionError(f"no running {stage} run logged {metric} within {timeout_s} s")


def test_mlflow_outage_mid_pretraining_fails_clearly_and_a_rerun_resumes(team, pipeline_run):
    longer = TINY.model_copy(update={"max_steps": 400, "checkpoint_every": 20, "eval_every": 100})
    parameters = {"ingest_params": params(IngestParams(sources=[str(team.corpus)], min_chars=50, val_fraction=0.3)),
                  "tokenizer_params": {"vocab_size": 512}, "pretrain_params": params(longer)}
    first = team.run_deployment("pipeline/pipeline", parameters)
    running = wait_for_running_stage(team, "pretrain", "pretrain/loss")
    services.stop("mlflow")
    failed = team.wait_for(first, FINAL)
    logs = team.logs(first)
    assert failed["state"]["type"] in {"FAILED", "CRASHED"}
    assert "stopped answering during the pretrain stage" in logs and "make up" in logs, logs[-4000:]

    services.up(["mlflow"])
    second = team.run_deployment("pipeline/pipeline", parameters)
    assert team.wait_for(second, FINAL)["state"]["type"] == "COMPLETED", team.logs(second)[-4000:]
    key = tags(running)["instructflow.key"]
    [run] = team.runs("pretrain", key)  # the same run, reopened: nothing lost, nothing doubled
    assert run["info"]["run_id"] == running["info"]["run_id"] and run["info"]["status"] == "FINISHED"
    history = team.mlflow.get("/api/2.0/mlflow/metrics/get-history", params={
        "run_id": run["info"]["run_id"], "metric_key": "pretrain/loss", "max_results": 5000}).json()["metrics"]
    assert sorted(m["step"] for m in history) == logged_steps(longer.max_steps)  # none lost, none twice
    assert [v["run_id"] for v in team.versions("pretrain")].count(run["info"]["run_id"]) == 1


def test_prefect_outage_mid_pipeline_fails_clearly_and_a_rerun_resumes(team, pipeline_run):
    """The CLI against the servers `make up` started (it finds them through the state dir's endpoints.json)."""
    command = [sys.executable, "-m", "flows.cli", "pipeline", "--source", str(team.corpus), "--vocab-size", "512",
               "--max-steps", "300"]
    env = {k: v for k, v in os.environ.items() if k not in EMBEDDED} | {"INSTRUCTFLOW_STATE_DIR": str(team.state)}
    first = subprocess.Popen(command, cwd=CHECKOUT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        running = wait_for_running_stage(team, "pretrain", "pretrain/loss")
        services.stop("prefect-server")
        out, err = first.communicate(timeout=600)
    finally:
        first.kill()
    assert first.returncode == 2, out + err
    assert "the Prefect server at" in err and "stopped answering" in err and "make up" in err, err[-3000:]

    services.up(["prefect-server", "prefect-worker"])
    second = subprocess.run(command, cwd=CHECKOUT, env=env, capture_output=True, text=True, timeout=600)
    assert second.returncode == 0, second.stdout + second.stderr
    [run] = team.runs("pretrain", tags(running)["instructflow.key"])
    assert run["info"]["status"] == "FINISHED"
    assert [v["run_id"] for v in team.versions("pretrain")].count(run["info"]["run_id"]) == 1


def test_no_token_or_password_reaches_logs_params_tags_or_flow_parameters(team, pipeline_run):
    """Runs last in the module: greps everything the runs above left behind for the secrets the servers hold."""
    admin = json.loads((team.state / "labelstudio" / "credentials.json").read_text())
    secrets = {admin["password"], admin["token"]}
    for token_file in (team.state / "ray").rglob("auth_token"):
        secrets.add(token_file.read_text().strip())
    secrets.discard("")
    assert secrets

    texts = {}
    for log in [*(team.state / "services").glob("*.log"), team.state / "labelstudio" / "server.log"]:
        texts[str(log)] = log.read_text(errors="replace")
    for run in team.runs():
        data = run["data"]
        texts[f"mlflow run {run['info']['run_id']}"] = json.dumps([data.get("params", []), data.get("tags", [])])
    for name in ("pretrain", "sft", "reward", "policy"):
        texts[f"registry {name}"] = json.dumps(team.versions(name))
    flow_runs = team.prefect.post("/flow_runs/filter", json={"limit": 200}).raise_for_status().json()
    assert flow_runs
    for flow_run in flow_runs:
        texts[f"prefect flow run {flow_run['id']} parameters"] = json.dumps(flow_run["parameters"])
        texts[f"prefect flow run {flow_run['id']} logs"] = team.logs(flow_run["id"])
    deployments = team.prefect.post("/deployments/filter", json={}).raise_for_status().json()
    texts["prefect deployments"] = json.dumps(deployments)
    leaks = [where for where, text in texts.items() for secret in secrets if secret in text]
    assert not leaks, f"a secret appears in: {leaks}"
