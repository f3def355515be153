"""One flow per stage, for running or scheduling a stage on its own (inputs are the URIs earlier stages returned)."""

from __future__ import annotations

from prefect import flow

from tasks.params import IngestParams, PretrainParams, TokenizerParams
from tasks.stages import ingest, pretrain, tokenize


@flow(name="ingest", log_prints=True)
def ingest_flow(params: IngestParams = IngestParams()) -> str:
    """Read, clean, dedupe and split the sources; returns the dataset directory URI."""
    return ingest(params)


@flow(name="tokenizer", log_prints=True)
def tokenizer_flow(dataset_uri: str, params: TokenizerParams = TokenizerParams()) -> str:
    """Tokenise an ingested dataset; returns the tokens.json URI."""
    return tokenize(dataset_uri, params)


@flow(name="pretrain", log_prints=True)
def pretrain_flow(tokens_uri: str, params: PretrainParams = PretrainParams()) -> str:
    """Pretrain a GPT on tokenised shards with Ray Train; returns the checkpoint URI."""
    return pretrain(tokens_uri, params)
