"""Typed stage parameters (pydantic): the Prefect UI renders them as forms; their JSON is part of each stage's cache key."""

from __future__ import annotations

import hashlib
import json
from typing import ClassVar, Literal

from pydantic import BaseModel, ConfigDict, Field


class Params(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)
    not_in_key: ClassVar[frozenset[str]] = frozenset()  # knobs that do not change a stage's result

    def fingerprint(self, *inputs: str) -> str:
        """A short hash of these parameters and the stage's input URIs: equal keys mean equal results."""
        values = self.model_dump(mode="json", exclude=set(self.not_in_key))
        payload = json.dumps({"params": values, "inputs": list(inputs)}, sort_keys=True)
        return hashlib.sha256(payload.encode()).hexdigest()[:16]


class IngestParams(Params):
    sources: list[str] = Field(
        default=["carrier:tiny-shakespeare"],
        description="files, directories, globs (txt/jsonl/parquet), http(s) URLs, hf:NAME, or carrier:NAME",
    )
    min_chars: int = Field(200, ge=1, description="documents shorter than this are dropped")
    near_duplicate_threshold: float = Field(0.8, gt=0, le=1, description="drop a document whose word-shingle Jaccard similarity to a kept one reaches this")
    val_fraction: float = Field(0.1, gt=0, lt=1)
    seed: int = 0


class TokenizerParams(Params):
    kind: Literal["bpe", "gpt2"] = Field("bpe", description="train a byte-level BPE, or use OpenAI's GPT-2 encoding")
    vocab_size: int = Field(4096, ge=264, description="for kind=bpe: vocabulary size including specials")
    parallel_chunks: int | None = Field(
        None, ge=1, description="tokenise in this many Ray tasks (None: in-process below 20M characters, else one per CPU)")

    # tokenising in chunks gives exactly the same shards
    not_in_key: ClassVar[frozenset[str]] = frozenset({"parallel_chunks"})


class PretrainParams(Params):
    preset: str = Field("tiny", description="model preset: tiny, gpt1, gpt2, gpt2-medium, ..., gpt3-175b")
    n_layer: int | None = None
    n_head: int | None = None
    n_embd: int | None = None
    block_size: int | None = None
    dropout: float | None = None
    max_steps: int = Field(300, ge=1)
    batch_size: int = Field(8, ge=1, description="sequences per micro-batch per worker")
    seq_len: int | None = Field(None, description="training window; defaults to the model's block_size")
    grad_accum: int = Field(1, ge=1)
    learning_rate: float | None = Field(None, description="defaults to the preset's paper value")
    warmup_steps: int = Field(30, ge=0)
    eval_every: int = Field(100, ge=1)
    checkpoint_every: int = Field(100, ge=1, description="each Ray checkpoint report costs a round trip")
    num_workers: int = Field(1, ge=1, description="Ray Train workers (data parallel)")
    use_gpu: bool | None = Field(None, description="None: use GPUs when the Ray cluster has them")
    max_failures: int = Field(1, ge=0, description="worker-group restarts from the last checkpoint before failing")
    compile: bool = Field(False, description="torch.compile the model (pays back only over thousands of steps)")
    seed: int = 1337

    # Resuming is exact (data order is fixed by the step), so how often a run checkpoints or how often it may
    # restart does not change its result: a re-run with other values continues the same run.
    not_in_key: ClassVar[frozenset[str]] = frozenset({"checkpoint_every", "max_failures", "compile"})
