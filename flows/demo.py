"""The demo: the pipeline on embedded defaults (Prefect ephemeral, local Ray, MLflow on SQLite), tiny presets.

ingest (TinyShakespeare) -> tokenizer (a 4,096-token BPE) -> pretrain (`tiny`, a Ray Train job), then a
summary: the MLflow run, the final validation loss, two samples and the command that opens the MLflow UI.
"""

from __future__ import annotations

import sys
import time

from flows.pipeline import pipeline
from tasks.params import IngestParams, PretrainParams, TokenizerParams
from tasks.reports import stage_timings, training_summary
from tasks.settings import mlflow_tracking_uri

DEMO_PRETRAIN = PretrainParams(preset="tiny", max_steps=600, batch_size=8, seq_len=128, warmup_steps=30,
                               eval_every=200, checkpoint_every=200)


def demo(max_steps: int = DEMO_PRETRAIN.max_steps) -> dict:
    started = time.perf_counter()
    result = pipeline(IngestParams(), TokenizerParams(), DEMO_PRETRAIN.model_copy(update={"max_steps": max_steps}))
    summary = training_summary(result["mlflow_run_id"])
    print(f"\npipeline finished in {time.perf_counter() - started:.0f} s; MLflow run {result['mlflow_run_id']}")
    for stage, seconds in stage_timings(result["mlflow_run_id"]).items():
        print(f"  {stage:<10} {seconds:6.1f} s")
    print(f"pretrain: loss {summary['first_loss']:.3f} -> {summary['final_loss']:.3f}, "
          f"final val loss {summary['final_val_loss']:.3f} after {summary['steps']} steps")
    for sample in summary["samples"][:2]:
        print("\n--- sample ---\n" + sample.strip())
    print(f"\ncheckpoint: {result['checkpoint']}")
    print(f"open the MLflow UI on this state:\n  .venv/bin/mlflow ui --host 127.0.0.1 --port 5000 "
          f"--backend-store-uri {mlflow_tracking_uri()}")
    return result


if __name__ == "__main__":
    from flows.cli import main

    sys.exit(main(["demo", *sys.argv[1:]]))
