"""A run's report card: report.md and its plots, from what the stages recorded in MLflow.

Where and what: the git commit, the machine, wall time per stage, the headline figures (the caller's summary, every
accuracy and win rate already carrying its n and 95% interval) and four plots, pretraining loss, fine-tuning
accuracy, the reward model's accuracy, and PPO's reward and KL. The card is logged on the run it describes (the
demo's pipeline run) under `report/`, and as a Prefect markdown artifact when a Prefect API is at hand.
"""

from __future__ import annotations

import datetime
import functools
import io
import json
import platform
from collections.abc import Mapping, Sequence
from pathlib import Path

from model.files import atomic_write
from tasks import tracking
from tasks.artifacts import publish_markdown
from tasks.reports import stage_runs, stage_timings
from tasks.settings import state_dir
from tasks.stats import with_interval
from tasks.tracking import git_commit

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


def credentials_file() -> Path:
    return state_dir() / "labelstudio" / "credentials.json"


def print_feedback_round(round_: dict, file=None) -> None:
    """Print the feedback round's figures, each with its n and 95% interval: comparisons, the reward model's accuracy,
    the PPO policy's win rate over SFT (temperature 1 and greedy), best-of-K, KL and readability."""
    from tasks.ranking import read_manifest

    say = functools.partial(print, file=file)  # a file of its own stays one where Prefect logs prints

    manifest = read_manifest(Path(round_["comparisons"]))
    rows = sum(v["rows"] for v in manifest.get("versions", []))
    rm = json.loads((Path(round_["reward"]).parent / "metrics.json").read_text())
    quality = round_["reward_quality"]
    who = "the SIMULATED labeler" if round_.get("labeler") == "simulated" else "people"
    say(f"ranking by {who}: {round_['new_comparisons']} new comparisons, {rows} in {round_['comparisons']}")
    say(f"reward model: {rm.get('human_rankings', 0)} rankings by people and {rm.get('simulated_rankings', 0)} by "
          f"the simulated labeler ({rm.get('train_rankings', 0)} for training, {rm.get('val_rankings', 0)} held out; "
          f"{rm.get('steps', 0)} steps)")
    if quality["accuracy"] is not None:
        accuracy = with_interval(quality["accuracy"], (quality["low"], quality["high"]), quality["rankings"])
        say(f"  held-out accuracy vs the labels {accuracy[:-1]} rankings; {quality['pairs']} pairs)")
    if rm.get("gold_accuracy") is not None:
        gold_pairs = int(rm.get("gold_pairs", 0))
        say(f"  held-out accuracy vs the hidden gold preference {100 * rm['gold_accuracy']:.1f}% on {gold_pairs} pairs")
    say(f"  look at the ranked tasks: {round_['labelstudio_project']} (log in with {credentials_file()})")
    if "skipped" in round_:
        say(f"PPO skipped: {round_['skipped']}")
        return
    judged = json.loads(Path(round_["judgement"]).read_text())
    n = judged["prompts"]

    def rate(prefix: str = "", suffix: str = "") -> str:
        value = judged[f"{prefix}win_rate{suffix}"]
        return with_interval(value, (judged[f"{prefix}win_rate{suffix}_low"], judged[f"{prefix}win_rate{suffix}_high"]), n)

    say(f"PPO policy vs SFT on {n} held-out prompts never ranked, judged by the {judged['judge']} preference:")
    say(f"  win rate at temperature {judged['temperature']:g}: {rate()} ({judged['wins']} wins, {judged['ties']} "
          f"ties, {judged['losses']} losses; a tie counts half)")
    if "win_rate_greedy" in judged:
        say(f"  win rate greedy: {rate(suffix='_greedy')} ({judged['wins_greedy']} wins, {judged['ties_greedy']} ties)")
    if "best_of_k_win_rate" in judged:
        say(f"  best-of-{judged['best_of_k']} from SFT picked by the reward model (no PPO): {rate('best_of_k_')}")
    say(f"  KL to SFT {judged['kl_to_sft']:.2f} nats per answer; answers' loss under SFT {judged['answer_nll']:.2f} "
          f"nats/token (SFT's own answers: {judged['answer_nll_baseline']:.2f}); reward-model score "
          f"{judged['reward_policy']:+.2f} vs {judged['reward_baseline']:+.2f}")
    if "correct_policy" in judged:
        say(f"  verified-correct answers {100 * judged['correct_policy']:.1f}% vs {100 * judged['correct_baseline']:.1f}%")
    promotion = round_["promotion"]
    say(f"policy version {promotion['version']}: " + ("promoted to policy@champion" if promotion["promoted"]
                                                          else "not promoted (it did not beat the champion)"))


def round_report_card(run_id: str, rounds: Sequence[dict], directory: Path) -> Path:
    """The report card of a feedback flow run: each round's figures, its stages' wall time and curves."""
    text = io.StringIO()
    for round_ in rounds:
        print(f"round {round_['round']}", file=text)
        print_feedback_round(round_, file=text)
    print(text.getvalue())
    timings = stage_timings(run_id, ("sample", "rank", "reward", "ppo", "judge"))
    return write_report_card(directory, title="instructflow feedback round: report card", summary=text.getvalue(),
                             run_ids=[run_id], log_on=run_id, timings=timings, wall_s=sum(timings.values()))
