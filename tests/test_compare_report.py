"""The comparison report's GPT-1 table: each variant as the mean ± standard deviation over its fine-tuning seeds."""

from __future__ import annotations

import json
from pathlib import Path

from tasks.compare import build_report


def stage_output(folder: Path, metrics: dict) -> str:
    folder.mkdir(parents=True)
    (folder / "metrics.json").write_text(json.dumps(metrics))
    return str(folder / "checkpoint")


def test_the_gpt1_table_reports_each_variant_over_its_seeds(tmp_path):
    base = {"task": "sentiment", "chance": 0.5, "majority": 0.49, "test_examples": 403}
    finetuned = {
        name: [stage_output(tmp_path / f"{i}-{seed}", {**base, "test_accuracy": acc, "test_macro_f1": acc - 0.01})
               for seed, acc in enumerate(accuracies)]
        for i, (name, accuracies) in enumerate({"pretrained, λ=0.5": [0.66, 0.68, 0.70],
                                                "scratch, λ=0.5": [0.55, 0.55, 0.55]}.items())}
    results = tmp_path / "results.json"
    results.write_text(json.dumps({"sentiment/k0": {"accuracy_mean": 0.5, "accuracy_unconditional": 0.5,
                                                    "chance": 0.5, "mean_k": 0}}))
    markdown, data = build_report(finetuned, {4: finetuned["pretrained, λ=0.5"][0]}, {}, str(results))
    assert "over 3 fine-tuning seeds" in markdown
    assert "| pretrained, λ=0.5 | sentiment | 68.0 ± 2.0 | 67.0 ± 2.0 | 403 | 50.0 | 49.0 |" in markdown
    assert "| scratch, λ=0.5 | sentiment | 55.0 ± 0.0 |" in markdown
    assert [m["test_accuracy"] for m in data["gpt1"]["pretrained, λ=0.5"]] == [0.66, 0.68, 0.70]
