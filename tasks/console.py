"""What the terminal shows while a run goes: progress lines from training, and not the internals of Ray or MLflow.

`configure_console(verbose)` runs once, before any flow: by default Ray's and MLflow's own lines (Ray Train's
checkpoint and worker-group messages, the C++ core's warnings, MLflow's UserWarnings and download bars) stay in
their log files (Ray's under the state dir's ray/ folder); `verbose=True` (`instructflow -v`) shows everything.
The settings travel as environment variables, so Ray's worker processes, started after this, inherit them.

`Progress` is the one progress display of a training stage: rank 0 prints a tqdm-formatted line (step / total,
rate, elapsed < ETA, the loss or the stage's headline metric) every few seconds; Ray forwards a worker's stdout to
the driver's console, one line at a time (a redrawn bar would arrive as a smear of carriage returns).
"""

from __future__ import annotations

import contextlib
import io
import logging
import os
import re
import sys
import time
import warnings
from collections.abc import Iterator, Mapping, Sequence

VERBOSE = "INSTRUCTFLOW_VERBOSE"
PROGRESS_EVERY = "INSTRUCTFLOW_PROGRESS_EVERY"  # seconds between progress lines (default 10)


def verbose() -> bool:
    return os.environ.get(VERBOSE, "") not in ("", "0")


def configure_console(verbose: bool = False) -> None:
    """Quiet Ray and MLflow on the console unless `verbose`; call before Ray starts (their processes inherit it)."""
    os.environ[VERBOSE] = "1" if verbose else "0"
    if verbose:
        return
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    os.environ.setdefault("MLFLOW_LOGGING_LEVEL", "WARNING")  # read when mlflow is first imported
    os.environ.setdefault("RAY_DEDUP_LOGS", "0")  # progress lines of two stages can look alike; never fold them
    # Ray Train sends a worker's print() through its logger (at INFO, filtered below): keep print a plain print
    os.environ.setdefault("RAY_TRAIN_ENABLE_PRINT_PATCH", "0")
    quiet_libraries()


def quiet_libraries() -> None:
    """In this process: MLflow's and Ray's Python loggers at WARNING, MLflow's UserWarnings not shown."""
    if verbose():
        return
    warnings.filterwarnings("ignore", category=UserWarning, module=r"mlflow(\.|$)")
    warnings.filterwarnings("ignore", category=FutureWarning, module=r"mlflow(\.|$)")
    # attributed to the module defining a pyfunc model, not to mlflow
    warnings.filterwarnings("ignore", message=r".*Add type hints to the `predict` method", category=UserWarning)
    for name in ("mlflow", "alembic"):
        logging.getLogger(name).setLevel(logging.WARNING)
    logging.getLogger("ray").setLevel(logging.ERROR)  # e.g. "Token authentication is enabled" at every start
    try:  # Ray Train's worker logs each report under a logger named by its file, outside "ray.train"
        from ray.train.v2._internal.execution import context
        logging.getLogger(context.__file__).setLevel(logging.WARNING)
    except ImportError:
        pass


# Ray's C++ core logs as "[2026-12-03 10:48:20,346 E 22798 22828] core_worker.cc:2465: ..."
_RAY_CORE_LINE = re.compile(r"^\[\d{4}-\d\d-\d\d [\d:,]+ [DIWEF] \d+ \d+\] \S+\.cc:\d+:")


def quiet_ray_driver() -> None:
    """After ray.init: the lines Ray forwards from its processes skip its C++ core's log lines unless verbose.

    Ray has no setting for this, so the driver's forwarding handler (a private hook of Ray 2.60) is wrapped; if
    that hook is not there, forwarding stays as it is.
    """
    if verbose():
        return
    try:
        from ray._private import worker
    except ImportError:
        return
    dispatcher = getattr(worker, "global_worker_stdstream_dispatcher", None)
    forward = dict(getattr(dispatcher, "handlers", [])).get("ray_print_logs")
    if forward is None or getattr(forward, "quiet", False):
        return

    def without_core_lines(data: dict) -> None:
        lines = [line for line in data.get("lines", []) if not _RAY_CORE_LINE.match(line)]
        if lines:
            forward({**data, "lines": lines})

    without_core_lines.quiet = True
    dispatcher.remove_handler("ray_print_logs")
    dispatcher.add_handler("ray_print_logs", without_core_lines)


@contextlib.contextmanager
def library_chatter() -> Iterator[None]:
    """Hold back what a library prints to stderr itself inside this block (MLflow's "Successfully registered model"),
    unless verbose; if the block fails, what was held back is printed after all."""
    if verbose():
        yield
        return
    held = io.StringIO()
    try:
        with contextlib.redirect_stderr(held):
            yield
    except BaseException:
        sys.stderr.write(held.getvalue())
        raise


def ray_logging_config():
    """Ray's logging config (ray.init's and Ray Train's RunConfig's): WARNING unless verbose."""
    import ray

    return ray.LoggingConfig(encoding="TEXT", log_level="INFO" if verbose() else "WARNING")


class Progress:
    """Progress lines of one training loop on rank 0: `label  42%|████      | 252/600 [00:31<00:43, 8.1step/s, loss=4.2]`.

    `update(step, metrics)` is called with every logged step (the loops' `log` callback); a line is printed at most
    every `every` seconds, and always at the last step. `show` names the metrics put after the bar (their latest
    values, e.g. "loss"). A resumed run passes `initial`, the step it resumed from, so rate and ETA count from there.
    """

    def __init__(self, label: str, total: int, unit: str = "step", show: Sequence[str] = ("loss",),
                 every: float | None = None, enabled: bool = True, initial: int = 0) -> None:
        self.label, self.total, self.unit, self.show = label, max(int(total), 1), unit, tuple(show)
        self.every = float(os.environ.get(PROGRESS_EVERY, "10")) if every is None else every
        self.enabled = enabled
        self.started = time.monotonic()
        self.initial = initial  # the step a resumed run starts from
        self.last_line = float("-inf")
        self.shown: dict[str, float] = {}
        self.finished = False

    def update(self, step: int, metrics: Mapping[str, float]) -> None:
        if not self.enabled or self.finished:
            return
        now = time.monotonic()
        self.shown.update({k: float(metrics[k]) for k in self.show if isinstance(metrics.get(k), (int, float))})
        if step < self.total and now - self.last_line < self.every:
            return
        self.last_line, self.finished = now, step >= self.total
        print(self.line(step, now - self.started), flush=True)

    def line(self, step: int, elapsed: float) -> str:
        from tqdm import tqdm

        done = step - self.initial
        rate = done / elapsed if elapsed > 0 and done > 0 else None
        postfix = ", ".join(f"{k.rsplit('/', 1)[-1]}={v:.4g}" for k, v in self.shown.items()) or None
        meter = tqdm.format_meter(min(step, self.total), self.total, elapsed, ncols=100, unit=self.unit, rate=rate,
                                  postfix=postfix, initial=self.initial, ascii=" #",
                                  bar_format="{percentage:3.0f}%|{bar:20}| {n_fmt}/{total_fmt} "
                                             "[{elapsed}<{remaining}, {rate_fmt}{postfix}]")
        return f"{self.label:<14} {meter}"
