"""The `rank` flow for real: Prefect (test harness) pausing for rankings, a real Label Studio, the comparisons dataset."""

from __future__ import annotations

import threading
import time

import pandas as pd
import pytest

from labelstudio_server import labelstudio_and_prefect, labelstudio_template  # noqa: F401 (fixtures)
from tasks import tracking
from tasks.params import RankParams

# verifiable prompts with a right answer, a near miss and nonsense: the gold preference orders them strictly
PROMPTS = {
    "Reverse the word: apple": ["elppa", "elpa", "dog"],
    "Uppercase: river": ["RIVER", "RIVEr", "x"],
    "Add 3 and 4": ["7", "17", "8"],
}


@pytest.fixture(scope="module")
def services(labelstudio_and_prefect):
    return labelstudio_and_prefect


def samples_file(path, prompts=PROMPTS) -> str:
    rows = [{"prompt": p, "response": r, "draw": j, "seed": 100 + j, "policy": "models:/sft/1", "run_id": "run"}
            for p, responses in prompts.items() for j, r in enumerate(responses)]
    pd.DataFrame(rows).to_parquet(path)
    return str(path)


def test_simulated_labeler_ranks_and_comparisons_follow_the_gold_preference(services, tmp_path):
    from flows.instruct import rank

    params = RankParams(project="rank flow simulated", labeler="simulated", noise=0.0, wait="collect",
                        dataset="test-simulated")
    first = rank(samples_file(tmp_path / "s.parquet"), 3, params)
    assert first["imported"] == 3 and first["new_rows"] == 9  # C(3, 2) ordered pairs per prompt, no ties
    frame = pd.read_parquet(first["version"])
    best = {p: r[0] for p, r in PROMPTS.items()}
    worst = {p: r[2] for p, r in PROMPTS.items()}
    assert all(best[p] == c for p, c in zip(frame["prompt"], frame["chosen"]) if c in best.values())
    assert not any(r == best[p] for p, r in zip(frame["prompt"], frame["rejected"]))
    assert all(worst[p] == r for p, c, r in zip(frame["prompt"], frame["chosen"], frame["rejected"]) if c != best[p])
    assert frame["simulated"].all()
    run = tracking.client().get_run(first["mlflow_run_id"])
    assert run.data.metrics["rank/comparisons_exported"] == 9 and run.data.metrics["rank/dataset_rows"] == 9

    again = rank(samples_file(tmp_path / "s.parquet"), 3, params)  # a re-run duplicates nothing
    assert again["imported"] == 0 and again["already_present"] == 3 and again["new_rows"] == 0 and again["version"] is None


def test_pause_resumes_by_itself_when_a_person_has_ranked_enough(services, tmp_path, monkeypatch):
    from flows.instruct import rank
    from tasks import feedback, labelstudio, ranking

    project = "rank flow people"
    one = {"Add 3 and 4": PROMPTS["Add 3 and 4"]}

    def person() -> None:  # ranks through the API after the flow has paused, like a labeler in the UI would
        ls = labelstudio.client()
        for _ in range(120):
            same = [p.id for p in ls.projects.list(title=project) if p.title == project]
            tasks = list(ls.tasks.list(project=same[0])) if same else []
            if tasks:
                break
            time.sleep(0.5)
        time.sleep(3)
        (task,) = tasks
        ids = {c["body"]: c["id"] for c in task.data["candidates"]}
        order = [[ids["8"]], [ids["7"]], [ids["17"]]]  # a person may disagree with the gold preference
        ls.annotations.create(id=task.id, result=ranking.ranking_result(order, 4), lead_time=12.5)

    labeler = threading.Thread(target=person)
    labeler.start()
    started = time.time()
    looked_up, polled = [], []  # threads that looked up the local server's URL (its start script), that polled
    monkeypatch.setattr(labelstudio, "_start_local_server", lambda real=labelstudio._start_local_server: (
        looked_up.append(threading.current_thread().name) or real()))
    monkeypatch.setattr(feedback, "ranked_tasks", lambda *args, real=feedback.ranked_tasks: (
        polled.append(threading.current_thread().name) or real(*args)))
    result = rank(samples_file(tmp_path / "p.parquet", one), 3,
                  RankParams(project=project, wait="pause", timeout_s=120, dataset="test-people"))
    labeler.join()
    assert time.time() - started < 100  # resumed by the watcher, not by the timeout
    assert "ranking-watcher" in polled and "ranking-watcher" not in looked_up  # polls reuse the wait's connection
    frame = pd.read_parquet(result["version"])
    assert sorted(zip(frame["chosen"], frame["rejected"])) == [("7", "17"), ("8", "17"), ("8", "7")]
    assert not frame["simulated"].any() and (frame["lead_time"] == 12.5).all()
