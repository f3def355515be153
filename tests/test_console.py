"""The console: progress lines at most every few seconds and at the end; the quiet default keeps Ray and MLflow
internals off the screen (the demo's own console is checked by running it: see the README)."""

from __future__ import annotations

import os
import subprocess
import sys

from tasks.console import Progress, _RAY_CORE_LINE


def test_progress_prints_every_interval_and_the_last_step(capsys, monkeypatch):
    clock = iter([0.0, 1.0, 2.0, 11.0, 12.0, 13.0, 14.0])
    monkeypatch.setattr("tasks.console.time.monotonic", lambda: next(clock))
    progress = Progress("pretrain", 5, every=10)  # started at t=0
    for step in range(1, 6):  # t = 1, 2, 11, 12, 13
        progress.update(step, {"loss": 10.0 / step, "lr": 1e-3})
    progress.update(5, {"accuracy": 0.9})  # a summary logged at the last step again: no second final line
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 3  # t=1 (first), t=11 (10 s later), and the last step
    assert lines[0].startswith("pretrain") and "1/5" in lines[0] and "loss=10" in lines[0]
    assert "3/5" in lines[1] and "5/5" in lines[2] and "100%" in lines[2] and "loss=2" in lines[2]
    assert "lr=" not in lines[2]  # only the metrics asked for


def test_progress_of_a_resumed_run_counts_its_rate_from_the_resume_step(capsys, monkeypatch):
    clock = iter([0.0, 10.0])
    monkeypatch.setattr("tasks.console.time.monotonic", lambda: next(clock))
    Progress("ppo", 2048, unit="episode", show=("objective/kl",), every=0, initial=1024).update(
        2048, {"objective/kl": 3.25})
    line = capsys.readouterr().out
    assert "2048/2048" in line and "102.40episode/s" in line and "kl=3.25" in line


def test_ray_core_log_lines_are_recognised_and_ours_are_not():
    assert _RAY_CORE_LINE.match("[2026-12-03 10:48:20,346 E 22798 22828] core_worker.cc:2465: Actor with class name")
    assert not _RAY_CORE_LINE.match("pretrain        17%|###     | 100/600 [00:10<00:50, 9.9step/s, loss=5.1]")


def test_quiet_console_hides_mlflow_warnings_and_verbose_shows_them():
    script = ("import sys, warnings\nfrom tasks.console import configure_console\n"
              "configure_console(verbose=sys.argv[1] == 'v')\n"
              "import mlflow, logging\n"
              "warnings.warn_explicit('a warning from mlflow', UserWarning, 'x.py', 1, module='mlflow.data')\n"
              "logging.getLogger('mlflow.store').info('an info line of mlflow')\n")
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MLFLOW_LOGGING", "INSTRUCTFLOW_VERBOSE"))}
    quiet, loud = (subprocess.run([sys.executable, "-c", script, mode], capture_output=True, text=True, env=env,
                                  timeout=120) for mode in ("q", "v"))
    assert quiet.returncode == 0 and loud.returncode == 0, quiet.stderr + loud.stderr
    assert "a warning from mlflow" not in quiet.stderr and "an info line of mlflow" not in quiet.stderr
    assert "a warning from mlflow" in loud.stderr and "an info line of mlflow" in loud.stderr
