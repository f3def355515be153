"""The pretraining pipeline: ingest -> tokenizer -> pretrain, each stage skipped when its inputs and config are unchanged."""

from __future__ import annotations

from prefect import flow

from tasks.params import IngestParams, PretrainParams, TokenizerParams
from tasks.stages import ingest, pipeline_run, pretrain, tokenize


@flow(name="pipeline", log_prints=True)
def pipeline(
    ingest_params: IngestParams = IngestParams(),
    tokenizer_params: TokenizerParams = TokenizerParams(),
    pretrain_params: PretrainParams = PretrainParams(),
) -> dict[str, str]:
    """Real text to a pretrained GPT; returns the URIs each stage produced and the pipeline's MLflow run id."""
    params = {"ingest": ingest_params.model_dump(), "tokenizer": tokenizer_params.model_dump(),
              "pretrain": pretrain_params.model_dump()}
    with pipeline_run("pipeline", params) as run_id:
        dataset = ingest(ingest_params, run_id)
        tokens = tokenize(dataset, tokenizer_params, run_id)
        checkpoint = pretrain(tokens, pretrain_params, run_id)
    return {"mlflow_run_id": run_id, "dataset": dataset, "tokens": tokens, "checkpoint": checkpoint}


if __name__ == "__main__":
    pipeline()
