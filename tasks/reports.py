"""Read back what a pipeline run recorded in MLflow: per-stage wall time, the training curve's ends, samples."""

from __future__ import annotations

from pathlib import Path

from tasks import tracking


def stage_runs(pipeline_run_id: str) -> dict[str, object]:
    """The stage runs that did the work for this pipeline run: its own children, or the reused ones."""
    client = tracking.client()
    parent = client.get_run(pipeline_run_id)
    children = client.search_runs([tracking.experiment_id()],
                                  f"tags.`{tracking.PARENT_TAG}` = '{pipeline_run_id}'")
    runs = {run.data.tags[tracking.STAGE_TAG]: run for run in children}
    for name, value in parent.data.tags.items():
        if name.startswith("instructflow.reused."):
            runs.setdefault(name.removeprefix("instructflow.reused."), client.get_run(value))
    return runs


def stage_timings(pipeline_run_id: str,
                  order: tuple[str, ...] = ("ingest", "tokenizer", "pretrain", "finetune", "evaluate")) -> dict[str, float]:
    """Seconds each stage's MLflow run was open (reused stages show the time they took when they ran)."""
    runs = stage_runs(pipeline_run_id)
    return {name: (runs[name].info.end_time - runs[name].info.start_time) / 1000 for name in order if name in runs}


def stage_time_of(stage: str, output_uri: str) -> dict[str, float]:
    """{stage: seconds} for the finished stage run that wrote `output_uri` (empty when there is none)."""
    runs = tracking.client().search_runs(
        [tracking.experiment_id()], f"tags.`{tracking.STAGE_TAG}` = '{stage}' and attributes.status = 'FINISHED'",
        order_by=["attributes.end_time DESC"], max_results=50)
    for run in runs:
        if run.data.tags.get(tracking.OUTPUT_TAG) == str(output_uri):
            return {stage: (run.info.end_time - run.info.start_time) / 1000}
    return {}


def training_summary(pipeline_run_id: str) -> dict:
    run = stage_runs(pipeline_run_id)["pretrain"]
    client = tracking.client()
    loss = client.get_metric_history(run.info.run_id, "pretrain/loss")
    val = client.get_metric_history(run.info.run_id, "pretrain/val_loss")
    samples_path = Path(run.data.tags[tracking.OUTPUT_TAG]).parent / "samples.txt"
    samples = samples_path.read_text().split("\n\n-----\n\n") if samples_path.exists() else []
    by_step = sorted(loss, key=lambda m: m.step)
    return {
        "run_id": run.info.run_id,
        "steps": by_step[-1].step if by_step else 0,
        "first_loss": by_step[0].value if by_step else float("nan"),
        "final_loss": by_step[-1].value if by_step else float("nan"),
        "final_val_loss": max(val, key=lambda m: m.step).value if val else float("nan"),
        "samples": samples,
    }


def latest_pretrained() -> tuple[Path, Path]:
    """Checkpoint and tokenizer of the newest finished pretrain stage (what `instructflow sample` uses)."""
    from model.errors import InstructflowError

    runs = tracking.client().search_runs(
        [tracking.experiment_id()], f"tags.`{tracking.STAGE_TAG}` = 'pretrain' and attributes.status = 'FINISHED'",
        order_by=["attributes.end_time DESC"], max_results=1)
    if not runs:
        raise InstructflowError("no pretrained model yet: run `make demo` or `instructflow pipeline` first")
    tags = runs[0].data.tags
    return Path(tags[tracking.OUTPUT_TAG]), Path(tags["instructflow.input.tokens"]).parent / "tokenizer.json"
