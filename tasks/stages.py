"""The pipeline's stages as Prefect tasks: each is one MLflow run, keyed and cached by its inputs + config.

A stage whose key already has a FINISHED run with its output still on disk is not recomputed: its output
URI is returned at once. A stage that failed is re-run in the same MLflow run (its curves continue) and,
for training stages, resumes from its latest checkpoint. Stages pass URIs (paths), never objects.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

from prefect import get_run_logger, task
from prefect.cache_policies import NO_CACHE

from model.config import GPTConfig, config_for, preset
from model.errors import InstructflowError
from model.files import atomic_write
from model.tokenizer import Tokenizer
from model.train import TrainConfig
from tasks import tracking
from tasks.artifacts import publish_link
from tasks.params import (DemonstrationParams, EvaluateParams, FinetuneParams, IngestParams, PretrainParams,
                          SampleParams, SFTParams, TaskParams, TokenizerParams)
from tasks.settings import stage_dir

def cached_stage(stage: str, key: str, params: dict, parent_run_id: str | None,
                 build: Callable[[str, Path], Path]) -> str:
    """Return the output URI of `stage` for `key`, building it with build(run_id, out_dir) unless cached.

    If the MLflow server stops answering, the stage fails with one clear message; its run stays unfinished (or is
    marked failed), and a re-run once MLflow is back continues that same run instead of starting a second one.
    """
    try:
        return _cached_stage(stage, key, params, parent_run_id, build)
    except Exception as error:
        if tracking.unreachable(error):
            raise tracking.outage_error(stage) from None
        raise


def _cached_stage(stage: str, key: str, params: dict, parent_run_id: str | None,
                  build: Callable[[str, Path], Path]) -> str:
    previous = tracking.find_stage_run(stage, key)
    if previous is not None and previous.finished and previous.output_uri and Path(previous.output_uri).exists():
        get_run_logger().info("%s: inputs and config unchanged, reusing MLflow run %s", stage, previous.run_id)
        if parent_run_id:
            tracking.set_tags(parent_run_id, {f"instructflow.reused.{stage}": previous.run_id})
        link_run(stage, previous.run_id, reused=True)
        return previous.output_uri
    if previous is not None and not previous.finished:
        run_id = tracking.reopen_stage_run(previous.run_id)
    else:
        run_id = tracking.create_stage_run(stage, key, params, parent_run_id)
    link_run(stage, run_id, reused=False)
    try:
        output = build(run_id, stage_dir(stage, key))
    except BaseException as error:
        if not tracking.unreachable(error):  # with MLflow down the run stays RUNNING; a re-run reopens it anyway
            tracking.fail_stage_run(run_id)
        raise
    tracking.finish_stage_run(run_id, str(output))
    return str(output)


def link_run(stage: str, run_id: str, reused: bool) -> None:
    """A Prefect link artifact from the stage's task run to its MLflow run."""
    publish_link(tracking.run_url(run_id), f"MLflow run {run_id[:8]} ({stage})", key=f"{stage}-mlflow-run",
                 description=f"{stage}: {'reused the' if reused else 'the'} MLflow run with its params, metrics and "
                             f"outputs (for a local SQLite store, open it with `mlflow ui --port 5000`)")


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
            snapshots_dir=out / "snapshots" if params.snapshots else None, placement_strategy=params.placement_strategy,
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


def resolve_model(checkpoint_uri: str, tokenizer_uri: str | None) -> tuple[str, str]:
    """A checkpoint directory + tokenizer file, or a registered model (models:/NAME/VERSION, models:/NAME@ALIAS)."""
    if checkpoint_uri.startswith("models:/"):
        checkpoint, tokenizer = tracking.registered_checkpoint(checkpoint_uri)
        return str(checkpoint), tokenizer_uri or str(tokenizer)
    if not tokenizer_uri:
        raise InstructflowError(f"give the tokenizer file that goes with {checkpoint_uri} (its tokenizer.json)")
    return checkpoint_uri, tokenizer_uri


def read_model_config(checkpoint_uri: str) -> GPTConfig:
    path = Path(checkpoint_uri) / "config.json"
    if not path.is_file():
        raise InstructflowError(f"{checkpoint_uri} is not a checkpoint directory (it has no config.json)")
    return GPTConfig.from_dict(json.loads(path.read_text()))


@task(name="finetune", cache_policy=NO_CACHE)
def finetune(checkpoint_uri: str, tokenizer_uri: str | None, task_params: TaskParams, params: FinetuneParams,
             parent_run_id: str | None = None) -> str:
    """GPT-1 fine-tuning (task head + L3) of a checkpoint as a Ray Train job; returns the fine-tuned checkpoint URI.

    The checkpoint is a directory or a registered model (then the tokenizer may be None: the model's own).
    With init="scratch" the checkpoint only gives the architecture (the paper's no-pretraining baseline).
    """
    from model.finetune import FinetuneConfig
    from tasks.finetune import finetune_job, run_finetuning, write_examples
    from tasks.labelled import finetune_examples

    checkpoint_uri, tokenizer_uri = resolve_model(checkpoint_uri, tokenizer_uri)

    task = task_params.load()
    tokenizer = Tokenizer.load(tokenizer_uri)
    model_config = read_model_config(checkpoint_uri)
    if params.dropout is not None:
        model_config = GPTConfig.from_dict({**model_config.to_dict(), "dropout": params.dropout})
    if params.transfer_layers is not None and params.transfer_layers > model_config.n_layer:
        raise InstructflowError(f"transfer_layers={params.transfer_layers} but the model has {model_config.n_layer} layers")
    max_len = min(params.max_len or model_config.block_size, model_config.block_size)
    train_rows = task.train[:params.max_train_examples] if params.max_train_examples else task.train
    key = params.fingerprint(checkpoint_uri, tokenizer_uri, task.sha256, task_params.model_dump_json())

    def build(run_id: str, out: Path) -> Path:
        train = finetune_examples(task, train_rows, tokenizer, max_len)
        test = finetune_examples(task, task.test, tokenizer, max_len)
        truncated = sum(ex.truncated for ex in train + test)
        if truncated:
            get_run_logger().warning("%s: %d of %d examples were longer than %d tokens and were truncated",
                                     task.name, truncated, len(train) + len(test), max_len)
        cfg = FinetuneConfig(learning_rate=params.learning_rate, batch_size=params.batch_size, epochs=params.epochs,
                             warmup_fraction=params.warmup_fraction, lm_weight=params.lm_weight,
                             eval_every=params.eval_every, seed=params.seed)
        n_classes = task.n_classes
        job = finetune_job(
            kind=task.kind, labels=list(task.labels), n_classes=n_classes,
            n_outputs=1 if task.kind == "multiple_choice" else n_classes, model_config=model_config,
            pretrained=Path(checkpoint_uri), init=params.init,
            transfer=model_config.n_layer if params.transfer_layers is None else params.transfer_layers,
            head_dropout=params.head_dropout, cfg=cfg, examples=write_examples(out / "examples.json", train, test),
            pad=tokenizer.eot_id, run_id=run_id, checkpoint_every=params.checkpoint_every,
        )
        checkpoint, final = run_finetuning(key=key, job=job, output_dir=out / "checkpoint",
                                           num_workers=params.num_workers, use_gpu=params.use_gpu,
                                           max_failures=params.max_failures)
        summary = {"task": task.name, "kind": task.kind, "test_accuracy": final["val_accuracy"],
                   "test_macro_f1": final["val_macro_f1"], "chance": task.chance, "majority": task.majority(),
                   "train_examples": len(train), "test_examples": len(test), "truncated_examples": truncated,
                   "steps": final["step"]}
        atomic_write(out / "metrics.json", json.dumps(summary, indent=2).encode())
        tracking.log_metrics(run_id, {f"finetune/{k}": v for k, v in summary.items() if not isinstance(v, str)},
                             step=final["step"])
        tracking.set_tags(run_id, {"instructflow.input.checkpoint": checkpoint_uri, "instructflow.task": task.name,
                                   "instructflow.checkpoint": str(checkpoint)})
        return checkpoint

    params_logged = {**params.model_dump(), "task": task_params.model_dump(), "max_len": max_len}
    return cached_stage("finetune", key, params_logged, parent_run_id, build)


@task(name="evaluate", cache_policy=NO_CACHE)
def evaluate(checkpoint_uri: str, tokenizer_uri: str | None, tasks: list[TaskParams], params: EvaluateParams,
             parent_run_id: str | None = None) -> str:
    """Zero/one/few-shot evaluation of a checkpoint on natural-language prompts; returns the results.json URI.

    Metrics are logged as `eval/<task>/<score>` with step = K, so MLflow plots each score against K.
    A (task, K) pair that fails keeps its scored examples; the stage then fails with their count, and a
    re-run continues where it stopped.
    """
    from tasks.evaluate import evaluate_many, shots_that_fit, write_inputs

    if not tasks:
        raise InstructflowError("no tasks to evaluate: give at least one task")
    checkpoint_uri, tokenizer_uri = resolve_model(checkpoint_uri, tokenizer_uri)
    loaded = [t.load() for t in tasks]
    if len({t.name for t in loaded}) != len(loaded):
        raise InstructflowError(f"task names repeat in {[t.name for t in loaded]}; each task needs its own name")
    context_len = read_model_config(checkpoint_uri).block_size
    key = params.fingerprint(checkpoint_uri, tokenizer_uri, *[t.sha256 for t in loaded])

    def build(run_id: str, out: Path) -> Path:
        inputs = {t.name: write_inputs(out / "inputs" / f"{t.name}.json", t, params.max_examples) for t in loaded}
        fits = shots_that_fit(inputs, Path(tokenizer_uri), context_len, params.max_new_tokens)
        unfit = {name: [k for k in sorted(set(params.shots)) if k > fit] for name, fit in fits.items()}
        unfit = {name: ks for name, ks in unfit.items() if ks}
        if unfit and not params.skip_unfit:  # before any work, not in the middle of a long evaluation
            details = "; ".join(f"{name}: K={ks} (about {fits[name]} fit)" for name, ks in unfit.items())
            raise InstructflowError(f"too many demonstrations for the model's {context_len}-token context: {details}. "
                                    "Lower shots, or set skip_unfit to evaluate the K values that fit")
        shots = {name: [k for k in sorted(set(params.shots)) if k <= fits[name]] for name in inputs}
        results = evaluate_many(Path(checkpoint_uri), Path(tokenizer_uri), inputs, shots, out, params.seed,
                                params.max_new_tokens)
        for name, ks in unfit.items():
            for k in ks:
                results[f"{name}/k{k}"] = {"partial": False, "skipped": f"K={k} does not fit (about {fits[name]} fit)"}
        path = atomic_write(out / "results.json", json.dumps(results, indent=2).encode())
        for pair, summary in results.items():
            name, k = pair.split("/k")
            values = {f"eval/{name}/{m}": v for m, v in summary.items() if isinstance(v, (int, float)) and m != "partial"}
            if values:
                tracking.log_metrics(run_id, values, step=int(k))
        tracking.client().log_artifact(run_id, str(path))
        tracking.set_tags(run_id, {"instructflow.input.checkpoint": checkpoint_uri})
        partial = {pair: r for pair, r in results.items() if r["partial"]}
        if partial:
            tracking.set_tags(run_id, {"instructflow.partial": "true"})
            details = "; ".join(f"{pair}: {int(r.get('examples', 0))} scored, then {r['error']}" for pair, r in partial.items())
            raise InstructflowError(f"evaluation incomplete ({details}). The scored examples are kept in "
                                    f"{out / 'records'} and results.json is marked partial; re-run to continue")
        return path

    params_logged = {**params.model_dump(), "tasks": [t.model_dump() for t in tasks]}
    return cached_stage("evaluate", key, params_logged, parent_run_id, build)


@task(name="sft", cache_policy=NO_CACHE)
def sft(checkpoint_uri: str, tokenizer_uri: str | None, demonstrations: DemonstrationParams, params: SFTParams,
        parent_run_id: str | None = None) -> str:
    """InstructGPT step 1: supervised fine-tuning on prompt -> demonstration pairs (Ray Train); returns the checkpoint URI.

    The checkpoint kept is the one with the lowest validation loss on held-out demonstrations; it is registered
    in MLflow as `sft`.
    """
    from model.sft import EpochPlan, SFTConfig, render
    from tasks.sft import run_sft, sft_job, write_rendered

    checkpoint_uri, tokenizer_uri = resolve_model(checkpoint_uri, tokenizer_uri)
    data = demonstrations.load()
    tokenizer = Tokenizer.load(tokenizer_uri)
    model_config = read_model_config(checkpoint_uri)
    seq_len = params.seq_len or model_config.block_size
    if seq_len > model_config.block_size:
        raise InstructflowError(f"seq_len={seq_len} is longer than the model's context of {model_config.block_size}")
    cfg = SFTConfig(learning_rate=params.learning_rate, batch_size=params.batch_size, seq_len=seq_len,
                    epochs=params.epochs, residual_dropout=params.residual_dropout, eval_every=params.eval_every,
                    seed=params.seed)
    key = params.fingerprint(checkpoint_uri, tokenizer_uri, data.sha256)

    def build(run_id: str, out: Path) -> Path:
        train = [render(tokenizer, d.prompt, d.response) for d in data.train]
        test = [render(tokenizer, d.prompt, d.response) for d in data.test]
        plan = EpochPlan(train, cfg, tokenizer.eot_id)
        if plan.truncated:
            get_run_logger().warning("sft: %d of %d demonstrations were longer than %d tokens; their responses were cut",
                                     plan.truncated, len(train), seq_len)
        job = sft_job(pretrained=Path(checkpoint_uri), cfg=cfg, rendered=write_rendered(out / "rendered.json", train, test),
                      best_dir=out / "best", pad=tokenizer.eot_id, run_id=run_id,
                      checkpoint_every=params.checkpoint_every, total_steps=plan.total_steps)
        checkpoint, final = run_sft(key=key, job=job, output_dir=out / "checkpoint", num_workers=params.num_workers,
                                    use_gpu=params.use_gpu, max_failures=params.max_failures)
        summary = {"best_step": final["best_step"], "best_val_loss": final["best_val_loss"],
                   "train_demonstrations": len(train), "test_demonstrations": len(test), "truncated": plan.truncated,
                   "steps": plan.total_steps}
        atomic_write(out / "metrics.json", json.dumps(summary, indent=2).encode())
        tracking.log_metrics(run_id, {f"sft/{k}": v for k, v in summary.items()}, step=plan.total_steps)
        shutil.copy2(tokenizer_uri, out / "tokenizer.json")  # the policy travels with its tokenizer
        version = tracking.register_text_model(run_id, "sft", checkpoint, Path(tokenizer_uri))
        tracking.set_tags(run_id, {"instructflow.input.checkpoint": checkpoint_uri, "instructflow.tokenizer": tokenizer_uri,
                                   "instructflow.demonstrations": data.source or data.name,
                                   "instructflow.registered": f"models:/sft/{version}"})
        return checkpoint

    params_logged = {**params.model_dump(), "demonstrations": demonstrations.model_dump(), "seq_len": seq_len}
    return cached_stage("sft", key, params_logged, parent_run_id, build)


@task(name="sample", cache_policy=NO_CACHE)
def sample(policy_uri: str, tokenizer_uri: str | None, params: SampleParams, parent_run_id: str | None = None) -> str:
    """K responses per prompt from a policy (checkpoint dir or registered model), on Ray; returns samples.parquet's URI."""
    import pandas as pd

    from tasks.sampling import sample_responses

    policy_uri_given = policy_uri
    policy_uri, tokenizer_uri = resolve_model(policy_uri, tokenizer_uri)
    prompts = params.load_prompts()
    key = params.fingerprint(policy_uri, tokenizer_uri, hashlib.sha256("\x00".join(prompts).encode()).hexdigest())

    def build(run_id: str, out: Path) -> Path:
        rows, duplicates = sample_responses(policy_uri, tokenizer_uri, prompts, params.k, seed=params.seed,
                                            temperature=params.temperature, top_p=params.top_p,
                                            max_new_tokens=params.max_new_tokens)
        frame = pd.DataFrame(rows).assign(policy=policy_uri_given, run_id=run_id)
        atomic_write(out / "samples.parquet", frame.to_parquet(index=False))
        per_prompt = frame.groupby("prompt").size()
        tracking.log_metrics(run_id, {"sample/prompts": len(prompts), "sample/responses": len(frame),
                                      "sample/duplicates_dropped": duplicates,
                                      "sample/min_responses_per_prompt": int(per_prompt.min())}, step=0)
        tracking.client().log_artifact(run_id, str(out / "samples.parquet"))
        tracking.set_tags(run_id, {"instructflow.input.policy": policy_uri_given})
        return out / "samples.parquet"

    return cached_stage("sample", key, {**params.model_dump(), "policy": policy_uri_given}, parent_run_id, build)


@contextmanager
def pipeline_run(name: str, params: dict) -> Iterator[str]:
    """The parent MLflow run of one pipeline run; stage runs nest under it. Marked FAILED if a stage raises."""
    run_id = tracking.start_pipeline_run(name, params)
    try:
        yield run_id
    except BaseException as error:
        try:
            tracking.fail_stage_run(run_id)
        except Exception:
            if not tracking.unreachable(error):  # MLflow is down: the stage's own clear message is the one to show
                raise
        raise
    tracking.client().set_terminated(run_id, "FINISHED")
