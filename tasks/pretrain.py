"""Pretraining as a Ray Train job: the plain loop from model/ in each worker, its checkpoints kept by Ray Train.

The driver side (`run_pretraining`) runs a `TorchTrainer` through tasks/ray_train.py's `fit_trainer`; the worker
side (`worker_loop`) builds the GPT and its optimiser and hands `model.train.train` to the shared `TrainWorker`,
which adds what distribution needs: DDP, resume from the latest checkpoint, rank-0-only metrics to MLflow and a
checkpoint every N steps (each report costs Ray a round trip, so not every step); each rank reads its own data
shard. A new run with the same key continues where the last one stopped: Ray Train restores its checkpoint list
from the run's storage directory.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from model.checkpoint import load_checkpoint, save_checkpoint
from model.config import GPTConfig
from model.errors import InstructflowError
from model.generate import generate
from model.gpt import GPT
from model.tokenizer import Tokenizer
from model.train import TrainConfig, TrainState, make_optimizer, train
from tasks.ray_train import TrainWorker, copy_checkpoint, fit_trainer
from tasks.runtime import choose_runtime, matmul_peak_flops

METRIC_PREFIX = "pretrain/"


def worker_loop(job: dict) -> None:
    """One Ray Train worker: resume if a checkpoint exists, train, report checkpoints every N steps."""
    worker = TrainWorker(job)
    device = worker.device
    cfg = TrainConfig(**job["train"])
    if cfg.peak_flops is None:
        cfg.peak_flops = matmul_peak_flops(device, worker.runtime.dtype, repeats=3)
    vocab = job["vocab_size"]
    train_tokens, val_tokens = _tokens(job["train_tokens"], vocab), _tokens(job["val_tokens"], vocab)

    torch.manual_seed(cfg.seed)
    model = GPT(GPTConfig.from_dict(job["model"])).to(device)
    optimizer = make_optimizer(model, cfg)

    def restore(directory: Path) -> TrainState:
        restored, extra = load_checkpoint(directory, device=device)
        model.load_state_dict(restored.state_dict())
        optimizer.load_state_dict(extra["optimizer"])
        return TrainState(step=extra["step"], tokens_seen=extra["tokens_seen"])

    def save(directory: Path, state: TrainState) -> None:
        extra = {"optimizer": optimizer.state_dict(), "step": state.step, "tokens_seen": state.tokens_seen}
        save_checkpoint(model, directory, extra=extra)

    def on_step_end(state: TrainState) -> None:
        last = state.history[-1] if state.history else {}
        summary = {"step": state.step, **{k: last[k] for k in ("loss", "val_loss") if k in last}}
        worker.on_step_end(state.step, cfg.max_steps, summary, lambda directory: save(directory, state))

    state = worker.resume(restore) or TrainState()
    ddp = worker.prepare(model)
    if job["compile"]:
        ddp = torch.compile(ddp)
    metrics = worker.track(METRIC_PREFIX, "pretrain", cfg.max_steps, initial=state.step)
    train(ddp, train_tokens, val_tokens, cfg, log=metrics.add, state=state, optimizer=optimizer,
          on_step_end=on_step_end, autocast=worker.runtime.autocast_factory, rank=worker.rank)


def _tokens(path: str, vocab_size: int) -> np.ndarray:
    from tasks.corpus import read_tokens

    return read_tokens(Path(path), vocab_size)


def run_pretraining(
    *,
    key: str,
    model_config: GPTConfig,
    train_config: TrainConfig,
    train_tokens: Path,
    val_tokens: Path,
    vocab_size: int,
    output_dir: Path,
    run_id: str | None,
    num_workers: int = 1,
    use_gpu: bool | None = None,
    checkpoint_every: int = 100,
    max_failures: int = 1,
    compile_model: bool = False,
    snapshots_dir: Path | None = None,
    placement_strategy: str = "PACK",
) -> Path:
    """Run the TorchTrainer for this key (resuming its latest checkpoint) and copy the final one to output_dir.

    With `snapshots_dir`, every reported checkpoint is kept and copied to `snapshots_dir/step-NNNNNN`
    (for curves over pretraining, e.g. GPT-1's zero-shot behaviour as pretraining goes on).
    """
    if train_config.max_seconds is not None:
        raise InstructflowError("max_seconds is for the single-process demo loop; give Ray jobs max_steps")
    job = {
        "model": model_config.to_dict(), "train": dataclasses.asdict(train_config), "vocab_size": vocab_size,
        "train_tokens": str(train_tokens), "val_tokens": str(val_tokens), "run_id": run_id,
        "checkpoint_every": checkpoint_every, "compile": compile_model,
    }
    result = fit_trainer(worker_loop, job, name=f"pretrain-{key}", num_workers=num_workers, use_gpu=use_gpu,
                         max_failures=max_failures, keep=None if snapshots_dir else 2,
                         placement_strategy=placement_strategy)
    if result.checkpoint is None:
        raise RuntimeError("the pretraining job ended without a checkpoint")
    for snapshot, metrics in (result.best_checkpoints or []) if snapshots_dir else []:
        with snapshot.as_directory() as directory:
            copy_checkpoint(Path(directory), snapshots_dir / f"step-{metrics['step']:06d}")
    with result.checkpoint.as_directory() as directory:
        copy_checkpoint(Path(directory), output_dir)
    return output_dir


def pretrain_local(
    train_tokens: np.ndarray,
    val_tokens: np.ndarray,
    config: GPTConfig,
    cfg: TrainConfig,
    checkpoint_dir: Path,
    log: Callable[[dict, int], None],
) -> TrainState:
    """The same training without Ray, in this process (the benchmark's baseline and the quick demo)."""
    runtime = choose_runtime()
    torch.manual_seed(cfg.seed)
    model = GPT(config).to(runtime.device)
    state = train(model, train_tokens, val_tokens, cfg, log=log, autocast=runtime.autocast_factory)
    save_checkpoint(model, checkpoint_dir, extra={"step": state.step, "tokens_seen": state.tokens_seen})
    return state


def sample_texts(checkpoint_dir: Path, tokenizer: Tokenizer, prompts: list[str], max_new_tokens: int = 80,
                 seed: int = 0) -> list[str]:
    """Prompt + continuation for each prompt, sampled with temperature 0.8 and top-k 50."""
    model, _ = load_checkpoint(checkpoint_dir, device=choose_runtime().device)
    encoded = [tokenizer.encode(p) for p in prompts]
    room = model.config.block_size - max(len(e) for e in encoded)  # a short context caps the sample's length
    out = generate(model, encoded, max(1, min(max_new_tokens, room)), temperature=0.8, top_k=50, seed=seed,
                   stop_tokens=[tokenizer.eot_id], pad_token=tokenizer.eot_id)
    return [p + tokenizer.decode([t for t in o if t != tokenizer.eot_id]) for p, o in zip(prompts, out)]
