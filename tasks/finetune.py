"""GPT-1 fine-tuning as a Ray Train job: model/finetune.py's loop in each worker, checkpoints through Ray.

The driver encodes the task once (GPT-1's input transformations) into `examples.json` next to the stage's
output, so workers read a URI rather than refetching data; the worker builds the GPT (pretrained weights,
some of their layers, or a random initialisation), adds the task head, trains with L3 and reports a
checkpoint every N steps and at the end. A new run with the same key resumes from Ray's latest checkpoint.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import torch

from model.checkpoint import load_checkpoint
from model.config import GPTConfig
from model.errors import InstructflowError
from model.files import atomic_write
from model.finetune import (Example, FinetuneConfig, FinetuneState, TaskModel, load_task_model,
                            save_task_model, transfer_layers)
from model.finetune import finetune as finetune_loop
from model.gpt import GPT
from model.train import make_optimizer
from tasks.ray_train import TrainWorker, copy_checkpoint, fit_trainer

METRIC_PREFIX = "finetune/"


def write_examples(path: Path, train: list[Example], test: list[Example]) -> Path:
    payload = {split: [[ex.sequences, ex.label] for ex in examples] for split, examples in (("train", train), ("test", test))}
    return atomic_write(path, json.dumps(payload).encode())


def read_examples(path: str | Path) -> tuple[list[Example], list[Example]]:
    payload = json.loads(Path(path).read_text())
    return tuple([Example(seqs, label) for seqs, label in payload[split]] for split in ("train", "test"))


def worker_loop(job: dict) -> None:
    """One Ray Train worker: build or restore the task model, fine-tune, report checkpoints."""
    worker = TrainWorker(job)
    cfg = FinetuneConfig(**job["finetune"])
    train_examples, test_examples = read_examples(job["examples"])
    total = -(-len(train_examples) // cfg.batch_size) * cfg.epochs

    torch.manual_seed(cfg.seed)
    gpt = GPT(GPTConfig.from_dict(job["model"]))
    if job["init"] == "pretrained":
        pretrained, _ = load_checkpoint(job["pretrained"])
        transfer_layers(pretrained, gpt, job["transfer_layers"])
    model = TaskModel(gpt, job["kind"], job["n_outputs"], job["head_dropout"]).to(worker.device)
    optimizer = make_optimizer(model, cfg)

    def restore(directory: Path) -> FinetuneState:
        restored, _, extra = load_task_model(directory, device=worker.device)
        model.load_state_dict(restored.state_dict())
        optimizer.load_state_dict(extra["optimizer"])
        return FinetuneState(step=extra["step"])

    def save(directory: Path, state: FinetuneState) -> None:
        save_task_model(model, directory, job["labels"], extra={"optimizer": optimizer.state_dict(), "step": state.step})

    def on_step_end(state: FinetuneState) -> None:
        last = state.history[-1] if state.history else {}
        summary = {"step": state.step, **{k: v for k, v in last.items() if k.startswith("val_") or k == "loss"}}
        worker.on_step_end(state.step, total, summary, lambda directory: save(directory, state))

    state = worker.resume(restore) or FinetuneState()
    ddp = worker.prepare(model)
    metrics = worker.track(METRIC_PREFIX, "finetune", total, initial=state.step, show=("loss", "val_accuracy"))
    with worker.runtime.autocast():
        finetune_loop(ddp, train_examples, test_examples, cfg, pad=job["pad"], n_classes=job["n_classes"],
                      log=metrics.add, state=state, optimizer=optimizer, on_step_end=on_step_end, rank=worker.rank,
                      world_size=worker.world_size)


def run_finetuning(*, key: str, job: dict, output_dir: Path, num_workers: int = 1, use_gpu: bool | None = None,
                   max_failures: int = 1) -> tuple[Path, dict]:
    """Run the fine-tuning TorchTrainer for `key`; returns (checkpoint dir, the final reported metrics)."""
    result = fit_trainer(worker_loop, job, name=f"finetune-{key}", num_workers=num_workers, use_gpu=use_gpu,
                         max_failures=max_failures)
    if result.checkpoint is None:
        raise RuntimeError("the fine-tuning job ended without a checkpoint")
    with result.checkpoint.as_directory() as directory:
        copy_checkpoint(Path(directory), output_dir, names=("model.pt", "config.json", "task.json"))
    return output_dir, dict(result.metrics or {})


def finetune_job(*, kind: str, labels: list[str], n_classes: int, n_outputs: int, model_config: GPTConfig,
                 pretrained: Path, init: str, transfer: int, head_dropout: float, cfg: FinetuneConfig,
                 examples: Path, pad: int, run_id: str | None, checkpoint_every: int) -> dict:
    if init not in ("pretrained", "scratch"):
        raise InstructflowError(f"init must be 'pretrained' or 'scratch', got {init!r}")
    return {
        "kind": kind, "labels": labels, "n_classes": n_classes, "n_outputs": n_outputs,
        "model": model_config.to_dict(), "pretrained": str(pretrained), "init": init, "transfer_layers": transfer,
        "head_dropout": head_dropout, "finetune": dataclasses.asdict(cfg), "examples": str(examples), "pad": pad,
        "run_id": run_id, "checkpoint_every": checkpoint_every,
    }
