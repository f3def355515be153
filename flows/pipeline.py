"""The pipeline: ingest -> tokenizer -> pretrain [-> finetune, evaluate], each stage skipped when its inputs and config are unchanged."""

from __future__ import annotations

from pathlib import Path

from prefect import flow

from tasks.params import EvaluateParams, FinetuneParams, IngestParams, PretrainParams, TaskParams, TokenizerParams
from tasks.ray_train import start_ray_in_background
from tasks.stages import evaluate, finetune, ingest, pipeline_run, pretrain, tokenize


@flow(name="pipeline", log_prints=True)
def pipeline(
    ingest_params: IngestParams = IngestParams(),
    tokenizer_params: TokenizerParams = TokenizerParams(),
    pretrain_params: PretrainParams = PretrainParams(),
    finetune_tasks: list[TaskParams] = [],  # noqa: B006 (pydantic copies defaults)
    finetune_params: FinetuneParams = FinetuneParams(),
    evaluate_tasks: list[TaskParams] = [],  # noqa: B006
    evaluate_params: EvaluateParams = EvaluateParams(),
) -> dict:
    """Real text to a pretrained GPT, then (optionally) GPT-1 fine-tuning and zero/few-shot evaluation.

    Returns the URIs each stage produced and the pipeline's MLflow run id.
    """
    params = {"ingest": ingest_params.model_dump(), "tokenizer": tokenizer_params.model_dump(),
              "pretrain": pretrain_params.model_dump(), "finetune_tasks": [t.model_dump() for t in finetune_tasks],
              "finetune": finetune_params.model_dump(), "evaluate_tasks": [t.model_dump() for t in evaluate_tasks],
              "evaluate": evaluate_params.model_dump()}
    start_ray_in_background()  # pretraining's Ray starts while the text is ingested and tokenised
    with pipeline_run("pipeline", params) as run_id:
        dataset = ingest(ingest_params, run_id)
        tokens = tokenize(dataset, tokenizer_params, run_id)
        checkpoint = pretrain(tokens, pretrain_params, run_id)
        tokenizer = str(Path(tokens).parent / "tokenizer.json")
        finetuned = {t.name: finetune(checkpoint, tokenizer, t, finetune_params, run_id) for t in finetune_tasks}
        results = evaluate(checkpoint, tokenizer, evaluate_tasks, evaluate_params, run_id) if evaluate_tasks else None
    return {"mlflow_run_id": run_id, "dataset": dataset, "tokens": tokens, "checkpoint": checkpoint,
            "tokenizer": tokenizer, "finetuned": finetuned, "evaluation": results}


if __name__ == "__main__":
    pipeline()
