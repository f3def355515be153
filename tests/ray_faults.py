"""Fault injection for Ray Train tests: kill a training worker once its run has committed a checkpoint."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable

import psutil

from tasks.settings import ray_temp_dir, state_dir


def kill_worker_after_first_checkpoint(run_prefix: str, started: float, stop: threading.Event) -> int | None:
    """Wait until Ray Train has committed a checkpoint of a run named `run_prefix`-*, then SIGKILL its worker.

    A checkpoint counts once the controller has written it into its snapshot: a checkpoint directory that
    exists but is not yet registered would not be restored (and a real crash there loses those steps).
    Returns the killed pid, or None when `stop` was set first.
    """
    results = state_dir() / "ray_results"
    while not stop.is_set():
        fresh = [p for p in results.glob(f"{run_prefix}-*/checkpoint_manager_snapshot.json") if p.stat().st_mtime > started]
        workers = own_ray_train_workers()
        if fresh and workers:
            workers[0].kill()
            return workers[0].pid
        time.sleep(0.05)
    return None


def own_ray_train_workers() -> list[psutil.Process]:
    """The Ray Train workers of this session's local Ray only: another Ray on the same machine (someone else's run,
    or a benchmark) keeps its workers. A worker is a child of its node's raylet, whose command line names the
    session's temp dir (under ray_temp_dir())."""
    ours = str(ray_temp_dir())
    workers = []
    for process in psutil.process_iter(["cmdline"]):
        if not (process.info["cmdline"] or [""])[0].startswith("ray::RayTrainWorker"):  # Ray renames its workers
            continue
        try:
            raylet = process.parent()
            if raylet is not None and any(ours in part for part in raylet.cmdline()):
                workers.append(process)
        except psutil.Error:  # it ended meanwhile
            continue
    return workers


def run_killing_a_worker(run: Callable[[], object], run_prefix: str, timeout: float = 600) -> tuple[int | None, list]:
    """Call `run` in a thread and SIGKILL its Ray Train worker after the first committed checkpoint of a run named
    `run_prefix`-*; returns (the killed pid or None, the exceptions `run` raised: it must fail, restarts being off)."""
    failures: list[BaseException] = []

    def target() -> None:
        try:
            run()
        except BaseException as e:  # noqa: BLE001 (the failure is what the caller checks)
            failures.append(e)

    started, stop = time.time(), threading.Event()
    thread = threading.Thread(target=target)
    thread.start()
    killed = kill_worker_after_first_checkpoint(run_prefix, started, stop)
    thread.join(timeout=timeout)
    stop.set()
    return killed, failures
