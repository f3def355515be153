"""The pipeline's stages as Prefect tasks: each is one MLflow run, keyed and cached by its inputs + config.

A stage whose key already has a FINISHED run with its output still on disk is not recomputed: its output
URI is returned at once. A stage that failed is re-run in the same MLflow run (its curves continue) and,
for training stages, resumes from its latest checkpoint. Stages pass URIs (paths), never objects.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

from prefect import get_run_logger, task
from prefect.cache_policies import NO_CACHE

from model.config import config_for, preset
from model.errors import InstructflowError
from model.tokenizer import Tokenizer
from model.train import TrainConfig
from tasks import tracking
from tasks.params import IngestParams, PretrainParams, TokenizerParams
from tasks.settings import stage_dir

def cached_stage(stage: str, key: str, params: dict, parent_run_id: str | None,
                 build: Callable[[str, Path], Path]) -> str:
    """Return the output URI of `stage` for `key`, building it with build(run_id, out_dir) unless cached."""
    previous = tracking.find_stage_run(stage, key)
    if previous is not None and previous.finished and previous.output_uri and Path(previous.output_uri).exists():
        get_run_logger().info("%s: inputs and config unchanged, reusing MLflow run %s", stage, previous.run_id)
        if parent_run_id:
            tracking.set_tags(parent_run_id, {f"instructflow.reused.{stage}": previous.run_id})
        return previous.output_uri
    if previous is not None and not previous.finished:
        run_id = tracking.reopen_stage_run(previous.run_id)
    else:
        run_id = tracking.create_stage_run(stage, key, params, parent_run_id)
    try:
        output = build(run_id, stage_dir(stage, key))
    except BaseException:
        tracking.fail_stage_run(run_id)
        raise
    tracking.finish_stage_run(run_id, str(output))
    return str(output)


@task(name="ingest", cache_policy=NO_CACHE)
def ingest(params: IngestParams, parent_run_id: str | None = None) -> str:
    """Read, clean, dedupe and split the sources; returns the dataset directory URI.

    The sources are always read (seconds even for a few MB); the cache key is the hash of what was read,
    so an edited file is noticed and an unchanged corpus is not cleaned again.
    """
    from tasks.ingest import clean_documents, read_documents, write_dataset

    documents, sources = read_documents(params.sources)
    content = hashlib.sha256("\x00".join(documents["text"]).encode()).hexdigest()

    def build(run_id: str, out: Path) -> Path:
        cleaned, cleaning = clean_documents(documents, params.min_chars, params.near_duplicate_threshold)
        manifest_path = write_dataset(cleaned, out, params.val_fraction, params.seed, sources=sources,
                                      cleaning=cleaning, config=params.model_dump())
        manifest = json.loads(manifest_path.read_text())
        tracking.log_metrics(run_id, {f"ingest/{k}": v for k, v in cleaning.items()}, step=0)
        tracking.log_metrics(run_id, {f"ingest/{split}_documents": n for split, n in manifest["documents"].items()},
                             step=0)
        tracking.log_dataset(run_id, out / "documents.parquet", name="corpus", digest=manifest["documents_sha256"])
        tracking.client().log_artifact(run_id, str(manifest_path))
        return out

    return cached_stage("ingest", params.fingerprint(content), params.model_dump(), parent_run_id, build)


@task(name="tokenize", cache_policy=NO_CACHE)
def tokenize(dataset_uri: str, params: TokenizerParams, parent_run_id: str | None = None) -> str:
    """Train (or load GPT-2's) tokenizer and write train/val token shards; returns the tokens.json URI."""
    from tasks.tokenize_corpus import tokenize_dataset

    def build(run_id: str, out: Path) -> Path:
        summary_path = tokenize_dataset(Path(dataset_uri), params, out)
        summary = json.loads(summary_path.read_text())
        tracking.log_metrics(run_id, {"tokenizer/vocab_size": summary["vocab_size"],
                                      "tokenizer/train_tokens": summary["train"]["tokens"],
                                      "tokenizer/val_tokens": summary["val"]["tokens"]}, step=0)
        tracking.client().log_artifact(run_id, str(summary_path))
        tracking.set_tags(run_id, {"instructflow.input.dataset": dataset_uri})
        return summary_path

    return cached_stage("tokenizer", params.fingerprint(dataset_uri), params.model_dump(), parent_run_id, build)


@task(name="pretrain", cache_policy=NO_CACHE)
def pretrain(tokens_uri: str, params: PretrainParams, parent_run_id: str | None = None) -> str:
    """Pretrain a GPT on the token shards as a Ray Train job; returns the checkpoint directory URI."""
    from tasks.pretrain import run_pretraining, sample_texts
    from tasks.tokenize_corpus import read_token_summary

    summary = read_token_summary(Path(tokens_uri))
    tokens_dir = Path(tokens_uri).parent
    overrides = {k: v for k in ("n_layer", "n_head", "n_embd", "block_size", "dropout")
                 if (v := getattr(params, k)) is not None}
    model_config = config_for(params.preset, vocab_size=summary["vocab_size"], **overrides)
    defaults = preset(params.preset).training
    seq_len = params.seq_len or model_config.block_size
    train_config = TrainConfig.from_defaults(
        defaults, seq_len=seq_len, batch_size=params.batch_size, grad_accum=params.grad_accum,
        max_steps=params.max_steps, warmup_steps=params.warmup_steps, eval_every=params.eval_every,
        log_every=max(1, min(10, params.eval_every)), seed=params.seed,
        **({"learning_rate": params.learning_rate} if params.learning_rate else {}),
    )
    for split in ("train", "val"):  # fail here, with the dataset named, rather than inside a Ray worker
        if summary[split]["tokens"] <= seq_len + 1:
            raise InstructflowError(
                f"the {split} split of {tokens_uri} has {summary[split]['tokens']} tokens, fewer than one training "
                f"window of {seq_len} + 1; ingest more text or lower seq_len/block_size"
            )
    key = params.fingerprint(tokens_uri)

    def build(run_id: str, out: Path) -> Path:
        checkpoint = run_pretraining(
            key=key, model_config=model_config, train_config=train_config,
            train_tokens=tokens_dir / "train.bin", val_tokens=tokens_dir / "val.bin",
            vocab_size=summary["vocab_size"], output_dir=out / "checkpoint", run_id=run_id,
            num_workers=params.num_workers, use_gpu=params.use_gpu, checkpoint_every=params.checkpoint_every,
            max_failures=params.max_failures, compile_model=params.compile,
        )
        tokenizer_path = tokens_dir / "tokenizer.json"
        samples = sample_texts(checkpoint, Tokenizer.load(tokenizer_path), ["\n", "The "], max_new_tokens=64)
        (out / "samples.txt").write_text("\n\n-----\n\n".join(samples))
        mlflow = tracking.client()
        mlflow.log_artifact(run_id, str(out / "samples.txt"))
        mlflow.log_dict(run_id, model_config.to_dict(), "model_config.json")
        version = tracking.register_text_model(run_id, "pretrain", checkpoint, tokenizer_path)
        tracking.set_tags(run_id, {"instructflow.input.tokens": tokens_uri, "instructflow.checkpoint": str(checkpoint),
                                   "instructflow.registered": f"models:/pretrain/{version}"})
        return checkpoint

    params_logged = {**params.model_dump(), "model": model_config.to_dict(), "train": train_config.__dict__}
    return cached_stage("pretrain", key, params_logged, parent_run_id, build)


@contextmanager
def pipeline_run(name: str, params: dict) -> Iterator[str]:
    """The parent MLflow run of one pipeline run; stage runs nest under it. Marked FAILED if a stage raises."""
    run_id = tracking.start_pipeline_run(name, params)
    try:
        yield run_id
    except BaseException:
        tracking.fail_stage_run(run_id)
        raise
    tracking.client().set_terminated(run_id, "FINISHED")
