"""The human loop's Prefect tasks: send samples to Label Studio, let the simulated labeler rank, wait, collect comparisons.

Comparisons land in an append-only versioned dataset (`<state>/datasets/comparisons/`, see tasks/ranking.py);
every collection is one MLflow run (stage `rank`) with the counts as metrics and the new version as a dataset.
"""

from __future__ import annotations

import difflib
import hashlib
import threading
import time
from pathlib import Path

from prefect import get_run_logger, task
from prefect.cache_policies import NO_CACHE
from pydantic import Field

from model.errors import InstructflowError
from tasks import tracking
from tasks.artifacts import publish_link
from tasks.settings import state_dir

PROJECT_DESCRIPTION = "instructflow: rank the model's responses to each prompt, best first (ties allowed)."


def comparisons_dir(name: str = "comparisons") -> Path:
    return state_dir() / "datasets" / name


def gold_preference(prompt: str, response: str) -> float:
    """The simulated labeler's hidden ("gold") preference, deterministic and documented, by the kind of prompt.

    - Review openings ("Continue the review: ..."): tasks.reviews.sentiment_preference, a sentiment regression's
      logit (favourable continuations win), the demo's feedback task.
    - The built-in verifiable instruction prompts: 1 for a correct answer (tasks.demonstrations.check), otherwise
      the character similarity (difflib ratio, below 1) between the response and the right answer, so near misses
      beat nonsense.
    - Other prompts fall back to tasks.ranking.gold_preference (word overlap with the prompt, then length).
    """
    from tasks.demonstrations import check, family_of, reference_answer
    from tasks.ranking import gold_preference as fallback
    from tasks.reviews import is_review_prompt, sentiment_preference

    if is_review_prompt(prompt):
        return sentiment_preference(prompt, response)
    if family_of(prompt) is None:
        return fallback(prompt, response)
    if check(prompt, response):
        return 1.0
    return 0.99 * difflib.SequenceMatcher(None, response.strip(), reference_answer(prompt)).ratio()


def has_gold_preference(prompt: str) -> bool:
    """Whether the gold preference is the task's own for this prompt (not the generic fallback): only then do
    gold accuracies and gold win rates mean something."""
    from tasks.demonstrations import family_of
    from tasks.reviews import is_review_prompt

    return is_review_prompt(prompt) or family_of(prompt) is not None


def ranking_items(samples_uri: str, round_name: str) -> list[dict]:
    """Sampled rows (one per response) grouped into one item per prompt, each response keeping its provenance."""
    import pandas as pd

    frame = pd.read_parquet(samples_uri)
    items = []
    for prompt, group in frame.groupby("prompt", sort=False):
        responses = [{"id": f"{row.run_id}:{row.draw}", "text": row.response,
                      "meta": {"seed": int(row.seed), "draw": int(row.draw), "policy": row.policy}}
                     for row in group.itertuples()]
        items.append({"prompt": prompt, "responses": responses, "round": round_name, "samples": samples_uri})
    return items


@task(name="label-studio", cache_policy=NO_CACHE)
def labelstudio_ready() -> str:
    """The URL of a Label Studio that accepts our key, starting the local server when none is configured (a round
    submits this while its policy samples, so the server's start-up overlaps the sampling)."""
    from tasks import labelstudio

    url, _ = labelstudio.connection()
    return url


@task(name="send-for-ranking", cache_policy=NO_CACHE, retries=2, retry_delay_seconds=5)
def send_for_ranking(samples_uri: str, project: str, levels: int, seed: int, round_name: str,
                     simulated_noise: float | None = None) -> dict:
    """Find or create the project, import the prompts it lacks (keyed by content); returns the project and counts.

    With `simulated_noise` (a round ranked by the SIMULATED labeler) every new task is imported already ranked by
    it, in the same request: the same rankings it would post one by one, a hundred times faster."""
    from tasks import labelstudio
    from tasks.ranking import INSTRUCTIONS, import_tasks, project_levels, ranking_config, simulated_importer

    ls = labelstudio.client()
    project_id = labelstudio.find_or_create_project(project, ranking_config(levels), PROJECT_DESCRIPTION, ls=ls,
                                                    instructions=INSTRUCTIONS)
    annotate = None if simulated_noise is None else simulated_importer(
        gold_preference, noise=simulated_noise, seed=seed, levels=project_levels(project_id, ls), ls=ls)
    counts = import_tasks(project_id, ranking_items(samples_uri, round_name), seed=seed, ls=ls, annotate=annotate)
    url, _ = labelstudio.connection()
    get_run_logger().info("Label Studio project %r (%s/projects/%d): %d tasks imported, %d already there",
                          project, url, project_id, counts["imported"], counts["already_present"])
    publish_link(f"{url}/projects/{project_id}", f"Label Studio project {project!r}", key="label-studio-project",
                 description="where the responses of this round are ranked (log in with the credentials in the state "
                             "dir's labelstudio folder)")
    return {"project_id": project_id, "url": f"{url}/projects/{project_id}", "imported": counts["imported"],
            "already_present": counts["already_present"], "unrankable": counts["unrankable"]}


@task(name="simulated-labeler", cache_policy=NO_CACHE)
def simulated_labeling(project_id: int, noise: float, seed: int, limit: int | None = None) -> dict:
    """Rank the project's open tasks as the SIMULATED labeler (its own Label Studio user; gold preference + noise)."""
    from tasks.ranking import run_simulated_labeler

    done = run_simulated_labeler(project_id, gold_preference, noise=noise, seed=seed, limit=limit)
    get_run_logger().info("simulated labeler ranked %d tasks (%d done before)", done["annotated"], done["already_done"])
    return done


def ranked_tasks(project_id: int, ls=None) -> tuple[int, int]:
    """(tasks with at least one annotation, tasks) of a project (through `ls`, a LabelStudio client, when given)."""
    from tasks import labelstudio

    project = (ls or labelstudio.client()).projects.get(id=project_id)
    return int(project.num_tasks_with_annotations or 0), int(project.task_number or 0)


@task(name="wait-for-rankings", cache_policy=NO_CACHE)
def wait_for_rankings(project_id: int, url: str, min_done: int | None, timeout_s: int, poll_s: float = 10.0) -> str:
    """Pause the flow run until a person resumes it (Prefect UI) or `min_done` tasks are ranked, or the timeout.

    The pause is Prefect's typed pause (`RankingsReady` input); a watcher thread resumes it by itself once
    enough tasks carry a ranking. Returns who resumed it: "person", "enough-ranked" or "timeout".
    """
    from prefect.context import get_run_context
    from prefect.flow_runs import pause_flow_run, resume_flow_run
    from prefect.input import RunInput

    class RankingsReady(RunInput):
        resumed_by: str = Field("person", description="who resumes the round (kept in the round's log)")
        note: str = Field("", description="optional: anything the next reader of this round should know")

    from tasks import labelstudio

    log = get_run_logger()
    ls = labelstudio.client()  # the URL and key are found once; every poll of the wait reuses them
    done, total = ranked_tasks(project_id, ls)
    target = total if min_done is None else min(min_done, total)
    flow_run_id = get_run_context().task_run.flow_run_id
    stop = threading.Event()

    def watch() -> None:
        last_said = time.monotonic()
        while not stop.wait(poll_s):
            try:
                ranked = ranked_tasks(project_id, ls)[0]
                if ranked >= target:
                    resume_flow_run(flow_run_id, run_input={"resumed_by": "enough-ranked"})
                    return
                if time.monotonic() - last_said >= 60:  # people rank for minutes: say where they are
                    log.info("%d of %d tasks ranked (resuming at %d)", ranked, total, target)
                    last_said = time.monotonic()
            except Exception as e:  # a flaky poll is retried; the pause's own timeout bounds the wait
                log.warning("could not poll Label Studio (%s); trying again", e)

    log.info("waiting for rankings in %s: %d of %d tasks ranked, resuming at %d (or resume the run in Prefect)",
             url, done, total, target)
    if done >= target:
        return "enough-ranked"
    watcher = threading.Thread(target=watch, name="ranking-watcher", daemon=True)
    watcher.start()
    try:
        form = RankingsReady.with_initial_data(description=(
            f"**Rank the responses in Label Studio**: open [the project]({url}), and for each task order the "
            f"cards from best to worst. {done} of {total} tasks are ranked now; the round goes on by itself once "
            f"{target} are. Resume here to go on with what is ranked so far."))
        answer = pause_flow_run(wait_for_input=form, timeout=timeout_s, poll_interval=min(poll_s, 10),
                                key=f"rankings-{project_id}")
    except Exception as e:
        if "timed out" in str(e).lower() or type(e).__name__ == "FlowPauseTimeout":
            log.warning("no resume within %d s; collecting what is ranked", timeout_s)
            return "timeout"
        raise
    finally:
        stop.set()
    log.info("resumed by %s%s; %d of %d tasks ranked", answer.resumed_by, f" ({answer.note})" if answer.note else "",
             *ranked_tasks(project_id, ls))
    return answer.resumed_by


@task(name="collect-comparisons", cache_policy=NO_CACHE, retries=2, retry_delay_seconds=5)
def collect_comparisons(project_id: int, project: str, dataset: str, parent_run_id: str | None,
                        round_name: str | None = None) -> dict:
    """Export the project's rankings -> all ordered pairs -> a new dataset version with only the new annotations.

    With `round_name`, the dataset version the round ended with is recorded (once) and returned as round_version."""
    from tasks.ranking import (append_comparisons, comparisons_from_export, export_rankings, read_manifest,
                               round_version)

    rows, stats = comparisons_from_export(export_rankings(project_id))
    out = comparisons_dir(dataset)
    key = hashlib.sha256(f"{project}\n{dataset}\n{time.time_ns()}".encode()).hexdigest()[:16]
    run_id = tracking.create_stage_run("rank", key, {"project": project, "project_id": project_id,
                                                      "dataset": str(out)}, parent_run_id)
    try:
        version = append_comparisons(out, rows)
        manifest = read_manifest(out)
        counts = {k: v for k, v in stats.items() if isinstance(v, (int, float))}
        agreement = stats.get("agreement", {})
        metrics = {f"rank/{k}": v for k, v in counts.items()}
        metrics |= {"rank/comparisons_exported": len(rows), "rank/agreement_pairs": agreement.get("pairs", 0),
                    "rank/dataset_rows": sum(v["rows"] for v in manifest.get("versions", []))}
        if agreement.get("rate") is not None:
            metrics["rank/agreement"] = agreement["rate"]
        tracking.log_metrics(run_id, metrics, step=len(manifest.get("versions", [])))
        if stats.get("problems"):
            get_run_logger().warning("%d annotations could not be read: %s", len(stats["problems"]),
                                     stats["problems"][:5])
        if version is not None:
            entry = manifest["versions"][-1]
            tracking.log_dataset(run_id, version, name=dataset, digest=entry["sha256"])
        tracking.client().log_dict(run_id, {k: v for k, v in stats.items()}, "ranking_stats.json")
    except BaseException:
        tracking.fail_stage_run(run_id)
        raise
    tracking.finish_stage_run(run_id, str(version or out))
    ended_with = round_version(out, round_name, appended=version is not None) if round_name else None
    return {"dataset": str(out), "version": str(version) if version else None, "round_version": ended_with,
            "new_rows": 0 if version is None else
            manifest["versions"][-1]["rows"], "stats": {k: v for k, v in stats.items() if k != "problems"},
            "mlflow_run_id": run_id}


def require_levels(k: int) -> int:
    """Rank levels for K responses: one per response, so a full strict ranking is always possible."""
    from tasks.ranking import MAX_LEVELS

    if not 2 <= k <= MAX_LEVELS:
        raise InstructflowError(f"K={k} responses cannot be ranked: use 2 to {MAX_LEVELS}")
    return max(4, k)
