"""The demo: the pipeline on embedded defaults (Prefect ephemeral, local Ray, MLflow on SQLite), tiny presets.

ingest (TinyShakespeare) -> tokenizer (a 4,096-token BPE) -> pretrain (`tiny`, a Ray Train job) -> GPT-1
fine-tuning on movie-review sentiment -> zero/one/few-shot evaluation (sentiment, QuaRTz) -> SFT on the
built-in verifiable instruction tasks -> K = 4 responses per held-out prompt -> ranked in a local Label Studio
by the SIMULATED labeler -> comparisons. Then a summary: the MLflow run, losses, samples, accuracies beside
chance, the ranking counts, and where to look (MLflow UI command, Label Studio URL and credentials file).
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

from flows.instruct import instruct
from flows.pipeline import pipeline
from tasks.params import (DemonstrationParams, EvaluateParams, FinetuneParams, IngestParams, PretrainParams,
                          RankParams, SampleParams, SFTParams, TaskParams, TokenizerParams)
from tasks.reports import stage_timings, training_summary
from tasks.settings import mlflow_tracking_uri, state_dir

DEMO_PRETRAIN = PretrainParams(preset="tiny", max_steps=600, batch_size=8, seq_len=128, warmup_steps=30,
                               eval_every=200, checkpoint_every=200)
# GPT-1's recipe at laptop scale: a 1,000-sentence slice, two epochs, and a learning rate for a 1.4M-parameter
# model (the paper's 6.25e-5 is for 117M parameters; measured here, 5e-4 and 1e-3 left a tiny model at chance).
DEMO_FINETUNE = FinetuneParams(max_train_examples=1000, epochs=2, learning_rate=3e-3, max_len=64)
DEMO_EVALUATE = EvaluateParams(shots=[0, 1, 3], max_examples=100, skip_unfit=True)
# InstructGPT's SFT recipe with a learning rate for a tiny model (the paper's 9.65e-6 is for 1.3B parameters)
DEMO_SFT = SFTParams(learning_rate=1e-3, batch_size=8, seq_len=128, epochs=6, eval_every=20)
DEMO_SAMPLE = SampleParams(n_prompts=16, k=4, max_new_tokens=16)
DEMO_RANK = RankParams(project="instructflow demo ranking", labeler="simulated", noise=0.1, wait="collect",
                       round="demo")


def credentials_file() -> Path:
    return state_dir() / "labelstudio" / "credentials.json"


def demo(max_steps: int = DEMO_PRETRAIN.max_steps) -> dict:
    started = time.perf_counter()
    result = pipeline(IngestParams(), TokenizerParams(), DEMO_PRETRAIN.model_copy(update={"max_steps": max_steps}),
                      finetune_tasks=[TaskParams(name="sentiment")], finetune_params=DEMO_FINETUNE,
                      evaluate_tasks=[TaskParams(name="sentiment"), TaskParams(name="quartz")],
                      evaluate_params=DEMO_EVALUATE)
    ranked = instruct(result["checkpoint"], result["tokenizer"], DemonstrationParams(), DEMO_SFT, DEMO_SAMPLE,
                      DEMO_RANK)
    summary = training_summary(result["mlflow_run_id"])
    print(f"\npipeline finished in {time.perf_counter() - started:.0f} s; MLflow run {result['mlflow_run_id']}")
    for stage, seconds in stage_timings(result["mlflow_run_id"]).items():
        print(f"  {stage:<10} {seconds:6.1f} s")
    print(f"pretrain: loss {summary['first_loss']:.3f} -> {summary['final_loss']:.3f}, "
          f"final val loss {summary['final_val_loss']:.3f} after {summary['steps']} steps")
    for sample in summary["samples"][:2]:
        print("\n--- sample ---\n" + sample.strip())
    for task, checkpoint in result["finetuned"].items():
        m = json.loads((Path(checkpoint).parent / "metrics.json").read_text())
        print(f"\nfine-tuned on {task}: test accuracy {100 * m['test_accuracy']:.1f}% "
              f"(macro-F1 {100 * m['test_macro_f1']:.1f}%; chance {100 * m['chance']:.0f}%, "
              f"{m['train_examples']} training examples, {m['steps']} steps)")
    print("\nin-context evaluation of the pretrained model (accuracy %, per-token-normalised option scores):")
    for pair, r in json.loads(Path(result["evaluation"]).read_text()).items():
        if "skipped" in r:
            print(f"  {pair:<14} {r['skipped']}")
            continue
        print(f"  {pair:<14} {100 * r['accuracy_mean']:5.1f}  (chance {100 * r['chance']:.0f}, "
              f"{int(r['examples'])} examples, mean K {r['mean_k']:.1f})")
    sft_metrics = json.loads((Path(ranked["sft"]).parent / "metrics.json").read_text())
    stats = ranked["stats"]
    print(f"\nSFT on {sft_metrics['train_demonstrations']} verifiable demonstrations: best validation loss "
          f"{sft_metrics['best_val_loss']:.3f} at step {sft_metrics['best_step']} of {sft_metrics['steps']}")
    print(f"ranking (SIMULATED labeler): {ranked['imported']} tasks imported ({ranked['already_present']} already there), "
          f"{stats.get('ranked', 0)} rankings, {stats.get('pairs', 0)} comparisons, {stats.get('skipped', 0)} skipped, "
          f"{stats.get('tied_pairs', 0)} tied pairs; {ranked['new_rows']} new rows in {ranked['dataset']}")
    print(f"  look at the ranked tasks: {ranked['url']} (log in with {credentials_file()})")
    print(f"\ncheckpoint: {result['checkpoint']}")
    print(f"open the MLflow UI on this state:\n  .venv/bin/mlflow ui --host 127.0.0.1 --port 5000 "
          f"--backend-store-uri {mlflow_tracking_uri()}")
    return result


if __name__ == "__main__":
    from flows.cli import main

    sys.exit(main(["demo", *sys.argv[1:]]))
