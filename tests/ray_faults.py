"""Fault injection for Ray Train tests: kill a training worker once its run has committed a checkpoint."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable

import psutil

from tasks.settings import state_dir


def kill_worker_after_first_checkpoint(run_prefix: str, started: float, stop: threading.Event) -> int | None:
    """Wait until Ray Train has committed a checkpoint of a run named `run_prefix`-*, then SIGKILL its worker.

    A checkpoint counts once the controller has written it into its snapshot: a checkpoint directory that
    exists but is not yet registered would not be restored (and a real crash there loses those steps).
    Returns the killed pid, or None when `stop` was set first.
    """
    results = state_dir() / "ray_results"
    while not stop.is_set():
        fresh = [p for p in results.glob(f"{run_prefix}-*/checkpoint_manager_snapshot.json") if p.stat().st_mtime > started]
        workers = [p for p in psutil.process_iter(["cmdline"])  # Ray renames its worker processes
                   if (p.info["cmdline"] or [""])[0].startswith("ray::RayTrainWorker")]
        if fresh and workers:
            workers[0].kill()
            return workers[0].pid
        time.sleep(0.05)
    return None


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
