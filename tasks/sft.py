"""InstructGPT step 1 as a Ray Train job: model/sft.py's loop in each worker, the best-validation weights kept.

The driver renders the demonstrations once (chat format, response-only loss mask) into `rendered.json`; each
worker loads the pretrained GPT, fine-tunes it, and rank 0 writes the weights of the best validation step to
`best/` as they appear (InstructGPT picked its SFT model by reward-model score; until a reward model exists,
the validation loss on held-out demonstrations decides). Checkpoints for resuming go through Ray every N steps.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path

import torch

from model.checkpoint import load_checkpoint, save_checkpoint
from model.files import atomic_write
from model.sft import Rendered, SFTConfig, SFTState
from model.sft import sft as sft_loop
from model.train import make_optimizer
from tasks.ray_train import TrainWorker, copy_checkpoint, fit_trainer

METRIC_PREFIX = "sft/"


def write_rendered(path: Path, train: list[Rendered], test: list[Rendered]) -> Path:
    payload = {split: [[r.ids, r.mask] for r in rows] for split, rows in (("train", train), ("test", test))}
    return atomic_write(path, json.dumps(payload).encode())


def read_rendered(path: str | Path) -> tuple[list[Rendered], list[Rendered]]:
    payload = json.loads(Path(path).read_text())
    return tuple([Rendered(ids, mask) for ids, mask in payload[split]] for split in ("train", "test"))


def worker_loop(job: dict) -> None:
    """One Ray Train worker: restore or load the pretrained model, run SFT, keep the best weights, report checkpoints."""
    worker = TrainWorker(job)
    rank, device = worker.rank, worker.device
    cfg = SFTConfig(**{**job["sft"], "betas": tuple(job["sft"]["betas"])})
    train_rows, val_rows = read_rendered(job["rendered"])
    best_dir, total = Path(job["best_dir"]), job["total_steps"]

    torch.manual_seed(cfg.seed)
    model, _ = load_checkpoint(job["pretrained"], device=device)
    optimizer = make_optimizer(model, cfg)

    def restore(directory: Path) -> SFTState:
        restored, extra = load_checkpoint(directory, device=device)
        model.load_state_dict(restored.state_dict())
        optimizer.load_state_dict(extra["optimizer"])
        return SFTState(step=extra["step"], best_val_loss=extra["best_val_loss"], best_step=extra["best_step"])

    def save(directory: Path, state: SFTState) -> None:
        extra = {"optimizer": optimizer.state_dict(), "step": state.step, "best_val_loss": state.best_val_loss,
                 "best_step": state.best_step}
        save_checkpoint(model, directory, extra=extra)

    def on_step_end(state: SFTState) -> None:
        if rank == 0 and state.best_step == state.step:  # the newest best: keep its weights
            save_checkpoint(model, best_dir, extra={"step": state.step, "val_loss": state.best_val_loss})
        summary = {"step": state.step, "best_step": state.best_step, "best_val_loss": state.best_val_loss,
                   "truncated": state.truncated}
        worker.on_step_end(state.step, total, summary, lambda directory: save(directory, state))

    state = worker.resume(restore) or SFTState()
    ddp = worker.prepare(model)
    metrics = worker.track(METRIC_PREFIX, "sft", total, initial=state.step)
    state = sft_loop(ddp, train_rows, val_rows, cfg, pad=job["pad"], log=metrics.add, state=state, optimizer=optimizer,
                     on_step_end=on_step_end, autocast=worker.runtime.autocast_factory, rank=rank,
                     world_size=worker.world_size)
    if rank == 0 and state.best_step == 0:  # SFT never beat the pretrained model on held-out demonstrations
        save_checkpoint(load_checkpoint(job["pretrained"])[0], best_dir, extra={"step": 0, "val_loss": state.best_val_loss})
    metrics.flush()


def run_sft(*, key: str, job: dict, output_dir: Path, num_workers: int = 1, use_gpu: bool | None = None,
            max_failures: int = 1) -> tuple[Path, dict]:
    """Run the SFT TorchTrainer for `key`; copy the best-validation weights to output_dir; returns (it, final metrics)."""
    result = fit_trainer(worker_loop, job, name=f"sft-{key}", num_workers=num_workers, use_gpu=use_gpu,
                         max_failures=max_failures)
    best = Path(job["best_dir"])
    if not (best / "model.pt").is_file():
        raise RuntimeError("the SFT job ended without its best checkpoint")
    copy_checkpoint(best, output_dir)
    shutil.rmtree(best, ignore_errors=True)
    return output_dir, dict(result.metrics or {})


def sft_job(*, pretrained: Path, cfg: SFTConfig, rendered: Path, best_dir: Path, pad: int, run_id: str | None,
            checkpoint_every: int, total_steps: int) -> dict:
    return {"pretrained": str(pretrained), "sft": dataclasses.asdict(cfg), "rendered": str(rendered),
            "best_dir": str(best_dir), "pad": pad, "run_id": run_id, "checkpoint_every": checkpoint_every,
            "total_steps": total_steps}
