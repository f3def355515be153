"""A run's report card: report.md and its plots, from what the stages recorded in MLflow.

Where and what: the git commit, the machine, wall time per stage, the headline figures (the caller's summary, every
accuracy and win rate already carrying its n and 95% interval) and four plots, pretraining loss, fine-tuning
accuracy, the reward model's accuracy, and PPO's reward and KL. The card is logged on the run it describes (the
demo's pipeline run) under `report/`, and as a Prefect markdown artifact when a Prefect API is at hand.
"""

from __future__ import annotations

import datetime
import platform
from collections.abc import Mapping, Sequence
from pathlib import Path

from model.files import atomic_write
from tasks import tracking
from tasks.artifacts import publish_markdown
from tasks.tracking import git_commit
from tasks.reports import stage_runs

# (plot file, title, stage, [(metric, label)], x label)
PLOTS = (
    ("pretrain_loss.png", "Pretraining loss", "pretrain",
     [("pretrain/loss", "train"), ("pretrain/val_loss", "validation")], "step"),
    ("finetune_accuracy.png", "GPT-1 fine-tuning: held-out accuracy", "finetune",
     [("finetune/val_accuracy", "accuracy"), ("finetune/val_macro_f1", "macro-F1")], "step"),
    ("reward_accuracy.png", "Reward model: ranking-pair accuracy", "reward",
     [("rm/accuracy", "train batches"), ("rm/val_accuracy", "held out")], "step"),
    ("ppo.png", "PPO: reward-model score and KL to SFT", "ppo",
     [("ppo/objective/scores", "score"), ("ppo/objective/kl", "KL (nats per answer)")], "episodes"),
)


def machine() -> str:
    import psutil
    import torch

    device = f"CUDA ({torch.cuda.get_device_name(0)}), bf16" if torch.cuda.is_available() else "CPU, fp32"
    return (f"{platform.system()} {platform.machine()}, {psutil.cpu_count(logical=True)} CPUs, "
            f"{psutil.virtual_memory().total / 2**30:.0f} GiB; Python {platform.python_version()}, "
            f"torch {torch.__version__}; training on {device}")


def plot_histories(runs: Mapping[str, object], directory: Path) -> list[Path]:
    """One PNG per plot in PLOTS whose stage ran and logged its metrics; returns their paths."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    client = tracking.client()
    written = []
    for filename, title, stage, series, xlabel in PLOTS:
        if stage not in runs:
            continue
        histories = [(label, sorted(client.get_metric_history(runs[stage].info.run_id, key), key=lambda m: m.step))
                     for key, label in series]
        histories = [(label, h) for label, h in histories if h]
        if not histories:
            continue
        figure, axis = plt.subplots(figsize=(6, 3.2), dpi=100)
        for label, history in histories:
            axis.plot([m.step for m in history], [m.value for m in history], label=label,
                      marker="o" if len(history) < 20 else None)
        axis.set(title=title, xlabel=xlabel)
        axis.grid(alpha=0.3)
        axis.legend()
        figure.tight_layout()
        path = directory / filename
        figure.savefig(path)
        plt.close(figure)
        written.append(path)
    return written


def render(title: str, summary: str, timings: Mapping[str, float], plots: Sequence[Path], wall_s: float) -> str:
    lines = [f"# {title}", "",
             f"- when: {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC",
             f"- commit: `{git_commit()}`", f"- machine: {machine()}",
             f"- wall time: {wall_s / 60:.1f} min (stages reused from an earlier run count the time they took then)",
             "", "## Wall time per stage", "", "| stage | seconds |", "|---|---:|"]
    lines += [f"| {stage} | {seconds:.0f} |" for stage, seconds in timings.items()]
    lines += ["", "## Headline figures", "", "```", summary.strip(), "```", ""]
    if plots:
        lines += ["## Curves", ""] + [f"![{p.stem}]({p.name})" for p in plots] + [""]
    return "\n".join(lines)


def write_report_card(directory: Path, *, title: str, summary: str, run_ids: Sequence[str], log_on: str,
                      timings: Mapping[str, float], wall_s: float) -> Path:
    """Write report.md and its plots into `directory` (stage runs found under `run_ids`), log them on the run
    `log_on` under report/, publish a Prefect markdown artifact; returns report.md's path."""
    directory.mkdir(parents=True, exist_ok=True)
    runs: dict[str, object] = {}
    for run_id in run_ids:
        runs.update(stage_runs(run_id))
    plots = plot_histories(runs, directory)
    report = atomic_write(directory / "report.md", render(title, summary, timings, plots, wall_s).encode())
    tracking.client().log_artifacts(log_on, str(directory), "report")
    publish_markdown(report.read_text(), key="report-card", description=f"{title}, MLflow run {log_on}")
    return report
