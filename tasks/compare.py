"""The papers' comparisons as one report: tables (markdown + JSON) and plots, logged to the comparison's MLflow run.

GPT-1 (Radford et al. 2018): pretrained vs randomly initialised fine-tuning and the auxiliary LM objective
(Table 5), accuracy vs the number of pretrained layers transferred (Figure 2 left), zero-shot accuracy over
pretraining (Figure 2 right). GPT-2/GPT-3: accuracy vs the number of in-context examples K. Chance and
majority-class accuracy stand beside every number: at laptop scale most results sit near them.
"""

from __future__ import annotations

import json
from pathlib import Path

from prefect import task
from prefect.cache_policies import NO_CACHE

from model.files import atomic_write
from tasks import tracking


def pretrain_snapshots(checkpoint_uri: str) -> list[tuple[int, str]]:
    """(step, checkpoint URI) of every snapshot kept beside a pretrained checkpoint, oldest first."""
    folder = Path(checkpoint_uri).parent / "snapshots"
    return sorted((int(p.name.removeprefix("step-")), str(p)) for p in folder.glob("step-*") if (p / "model.pt").is_file())


def finetune_metrics(checkpoint_uri: str) -> dict:
    return json.loads((Path(checkpoint_uri).parent / "metrics.json").read_text())


def eval_results(results_uri: str) -> dict:
    return json.loads(Path(results_uri).read_text())


def _pct(x: float | None) -> str:
    return "–" if x is None else f"{100 * x:.1f}"


def _mean_sd(values: list[float]) -> str:
    """'65.3 ± 1.2' in percent: the mean and the sample standard deviation over seeds."""
    mean = sum(values) / len(values)
    sd = (sum((v - mean) ** 2 for v in values) / (len(values) - 1)) ** 0.5 if len(values) > 1 else float("nan")
    return f"{100 * mean:.1f} ± {100 * sd:.1f}"


def build_report(finetuned: dict[str, list[str]], transfer: dict[int, str], zero_shot: dict[int, str], fewshot: str,
                 scoring: str = "mean") -> tuple[str, dict]:
    """The markdown tables and the numbers behind them, from the stages' output URIs (fine-tuning variants: one URI
    per seed)."""
    data = {"gpt1": {k: [finetune_metrics(u) for u in v] for k, v in finetuned.items()},
            "transfer": {n: finetune_metrics(v) for n, v in transfer.items()},
            "zero_shot": {step: eval_results(v) for step, v in zero_shot.items()},
            "fewshot": eval_results(fewshot)}
    seeds = max((len(runs) for runs in data["gpt1"].values()), default=0)
    lines = ["## GPT-1: pretraining and the auxiliary LM objective (cf. Table 5)", "",
             f"Mean ± standard deviation over {seeds} fine-tuning seeds; n = test examples.", "",
             "| variant | task | test accuracy % | macro-F1 % | n | chance % | majority % |", "|---|---|---|---|---|---|---|"]
    for name, runs in data["gpt1"].items():
        m = runs[0]
        lines.append(f"| {name} | {m['task']} | {_mean_sd([r['test_accuracy'] for r in runs])} | "
                     f"{_mean_sd([r['test_macro_f1'] for r in runs])} | {m.get('test_examples', '–')} | "
                     f"{_pct(m['chance'])} | {_pct(m['majority'])} |")
    lines += ["", "## GPT-1: layers transferred from pretraining (cf. Figure 2, left)", "",
              "| blocks transferred | test accuracy % | macro-F1 % |", "|---|---|---|"]
    for n, m in sorted(data["transfer"].items()):
        lines.append(f"| {n} | {_pct(m['test_accuracy'])} | {_pct(m['test_macro_f1'])} |")
    tasks = sorted({pair.split("/k")[0] for pair in data["fewshot"]})
    lines += ["", f"## Zero-shot accuracy over pretraining (cf. GPT-1 Figure 2, right; score: {scoring})", "",
              "| pretraining step | " + " | ".join(tasks) + " |", "|---|" + "---|" * len(tasks)]
    for step, results in sorted(data["zero_shot"].items()):
        cells = [_pct(results.get(f"{t}/k0", {}).get(f"accuracy_{scoring}")) for t in tasks]
        lines.append(f"| {step} | " + " | ".join(cells) + " |")
    shots = sorted({int(pair.split("/k")[1]) for pair in data["fewshot"]})
    lines += ["", "## In-context learning: accuracy vs K (cf. GPT-3 Figure 1.2)", "",
              "| task | " + " | ".join(f"K={k} ({scoring} / unconditional)" for k in shots) + " | chance % |",
              "|---|" + "---|" * (len(shots) + 1)]
    for t in tasks:
        cells = []
        for k in shots:
            r = data["fewshot"].get(f"{t}/k{k}", {})
            if "skipped" in r:
                cells.append("does not fit")
                continue
            cell = f"{_pct(r.get(f'accuracy_{scoring}'))} / {_pct(r.get('accuracy_unconditional'))}"
            cells.append(cell + (f" (mean K {r['mean_k']:.1f})" if k and r.get("mean_k", k) < k else ""))
        chance = data["fewshot"].get(f"{t}/k0", {}).get("chance")
        lines.append(f"| {t} | " + " | ".join(cells) + f" | {_pct(chance)} |")
    return "\n".join(lines) + "\n", data


def plot_report(data: dict, path: Path, scoring: str = "mean") -> Path:
    """Three panels: accuracy vs layers transferred, zero-shot accuracy vs pretraining step, accuracy vs K."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(15, 4))
    transfer = sorted(data["transfer"].items())
    if transfer:
        axes[0].plot([n for n, _ in transfer], [m["test_accuracy"] for _, m in transfer], marker="o", label="fine-tuned")
        axes[0].axhline(transfer[0][1]["chance"], ls="--", c="grey", label="chance")
    axes[0].set(title="GPT-1: blocks transferred", xlabel="blocks transferred", ylabel="test accuracy")
    tasks = sorted({pair.split("/k")[0] for pair in data["fewshot"]})
    steps = sorted(data["zero_shot"])
    for t in tasks:
        axes[1].plot(steps, [data["zero_shot"][s].get(f"{t}/k0", {}).get(f"accuracy_{scoring}") for s in steps],
                     marker="o", label=t)
        shots = sorted(int(p.split("/k")[1]) for p, r in data["fewshot"].items() if p.startswith(f"{t}/k") and "skipped" not in r)
        axes[2].plot(shots, [data["fewshot"][f"{t}/k{k}"].get(f"accuracy_{scoring}") for k in shots], marker="o", label=t)
    axes[1].set(title="zero-shot over pretraining", xlabel="pretraining step", ylabel="accuracy")
    axes[2].set(title="in-context examples", xlabel="K", ylabel="accuracy")
    for ax in axes:
        ax.legend(fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


@task(name="report", cache_policy=NO_CACHE)
def log_report(run_id: str, out: Path, finetuned: dict[str, str], transfer: dict[int, str],
               zero_shot: dict[int, str], fewshot: str) -> Path:
    """Write report.md, report.json and report.png under `out` and log them to the comparison run."""
    markdown, data = build_report(finetuned, transfer, zero_shot, fewshot)
    atomic_write(out / "report.md", markdown.encode())
    atomic_write(out / "report.json", json.dumps(data, indent=2, default=str).encode())
    plot_report(data, out / "report.png")
    client = tracking.client()
    for name in ("report.md", "report.json", "report.png"):
        client.log_artifact(run_id, str(out / name))
    metrics = {f"compare/gpt1/{name.replace(' ', '_').replace(',', '').replace('=', '')}":
               sum(r["test_accuracy"] for r in runs) / len(runs) for name, runs in data["gpt1"].items()}
    metrics |= {f"compare/transfer/{n}_blocks": m["test_accuracy"] for n, m in data["transfer"].items()}
    tracking.log_metrics(run_id, {k.replace("λ", "lambda"): v for k, v in metrics.items()}, step=0)
    return out / "report.md"
