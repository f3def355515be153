"""Is data-parallel training right on this Ray cluster? One DDP step across workers against one process's gradient.

`check_ddp` runs a Ray Train job through `fit_trainer`, like pretraining: every worker builds the pretraining
worker's GPT from the same seed, takes its rank's share of a fixed global batch (`batch_at(..., rank=rank)`),
and does one real backward through the `prepare_model`-wrapped model, so DDP all-reduces the gradients over
the cluster's network. Rank 0 hands back the averaged gradients and every worker's node id; the driver then
computes the gradient of the mean loss over the whole global batch in one process and compares the two.
A missing or wrong all-reduce shows up as a difference the size of the gradients themselves.
"""

from __future__ import annotations

import dataclasses
import shutil
import time
from pathlib import Path

import numpy as np
import torch

from model.config import GPTConfig, config_for
from model.gpt import GPT
from model.train import TrainConfig, batch_at
from tasks.ray_train import TrainWorker, fit_trainer
from tasks.settings import state_dir

# Relative to the largest gradient entry. fp32 sums taken in another order differ by ~1e-7 of it; a gradient
# that was not all-reduced differs by ~1 (see "unsynced_rel_diff" in the result).
DEFAULT_TOLERANCE = 1e-4


def check_model_config() -> GPTConfig:
    """The tiny preset, smaller still and without dropout (dropout would make the workers' gradients random)."""
    return config_for("tiny", vocab_size=512, block_size=64, n_layer=2, n_embd=64, dropout=0.0)


def check_tokens(vocab_size: int, seed: int) -> np.ndarray:
    """A fixed token stream that every worker and the driver rebuild alike (random ids are as good as text here)."""
    return np.random.default_rng(seed).integers(0, vocab_size, size=20_000, dtype=np.int64)


def check_ddp(num_workers: int = 2, placement_strategy: str = "SPREAD", *, use_gpu: bool | None = None,
              model_config: GPTConfig | None = None, batch_size: int = 4, seed: int = 1337,
              tolerance: float = DEFAULT_TOLERANCE) -> dict:
    """Run one DDP step on `num_workers` Ray Train workers and compare its gradient with a single process's.

    Returns the per-rank node ids, how many distinct nodes they were, the global batch's loss, the largest
    absolute gradient difference, that difference relative to the largest gradient entry ("max_rel_diff"),
    the same for rank 0's unsynchronised gradient ("unsynced_rel_diff": what a broken all-reduce would show)
    and "ok": max_rel_diff <= tolerance.
    """
    model_config = model_config or check_model_config()
    train = TrainConfig(batch_size=batch_size, seq_len=model_config.block_size, seed=seed)
    job = {"model": model_config.to_dict(), "train": dataclasses.asdict(train)}
    name = f"cluster-check-{time.time_ns()}"
    result = fit_trainer(gradient_worker, job, name=name, num_workers=num_workers, use_gpu=use_gpu,
                         max_failures=0, keep=1, placement_strategy=placement_strategy)
    try:
        with result.checkpoint.as_directory() as directory:
            reported = torch.load(Path(directory) / "gradients.pt", weights_only=True)
    finally:
        shutil.rmtree(state_dir() / "ray_results" / name, ignore_errors=True)  # a check leaves nothing behind

    tokens = check_tokens(model_config.vocab_size, seed)
    batches = [batch_at(tokens, 0, 0, train, rank=rank) for rank in range(num_workers)]
    reference, loss = single_process_gradient(model_config, seed, batches)
    unsynced, _ = single_process_gradient(model_config, seed, batches[:1])
    largest = max(g.abs().max().item() for g in reference.values())
    max_abs = max((reported["grads"][n] - g).abs().max().item() for n, g in reference.items())
    unsynced_abs = max((reported["grads"][n] - unsynced[n]).abs().max().item() for n in reference)
    return {
        "num_workers": num_workers, "placement_strategy": placement_strategy,
        "node_ids": reported["node_ids"], "nodes": len(set(reported["node_ids"])),
        "loss": loss, "max_abs_diff": max_abs, "max_rel_diff": max_abs / largest,
        "unsynced_rel_diff": unsynced_abs / largest, "tolerance": tolerance, "ok": max_abs / largest <= tolerance,
    }


def single_process_gradient(config: GPTConfig, seed: int,
                            batches: list[tuple[torch.Tensor, torch.Tensor]]) -> tuple[dict[str, torch.Tensor], float]:
    """The gradient of the mean loss over the union of `batches`, in this process on the CPU, and that loss."""
    torch.manual_seed(seed)
    model = GPT(config)
    x = torch.cat([b[0] for b in batches])  # (ranks * B, T)
    y = torch.cat([b[1] for b in batches])
    _, loss = model(x, y)
    loss.backward()
    return {n: p.grad.detach().clone() for n, p in model.named_parameters()}, loss.item()


def gradient_worker(job: dict) -> None:
    """One Ray Train worker of the check: the pretraining worker's model, one DDP backward, results from rank 0."""
    import ray
    import torch.distributed as dist

    worker = TrainWorker(job)
    device = worker.device
    cfg = TrainConfig(**job["train"])
    config = GPTConfig.from_dict(job["model"])
    torch.manual_seed(cfg.seed)  # as worker_loop: every rank starts from the same weights
    model = GPT(config).to(device)
    ddp = worker.prepare(model)  # DistributedDataParallel when there are several workers
    x, y = batch_at(check_tokens(config.vocab_size, cfg.seed), 0, 0, cfg, rank=worker.rank)
    _, loss = ddp(x.to(device), y.to(device))  # fp32, no autocast: compared with a CPU fp32 run
    loss.backward()  # DDP averages the gradients over all workers during this call

    node_ids = [ray.get_runtime_context().get_node_id()]
    if worker.world_size > 1:
        node_ids = [None] * worker.world_size
        dist.all_gather_object(node_ids, ray.get_runtime_context().get_node_id())

    def save(directory: Path) -> None:
        directory.mkdir()
        grads = {n: p.grad.detach().cpu() for n, p in model.named_parameters()}
        torch.save({"grads": grads, "node_ids": node_ids}, directory / "gradients.pt")

    worker.report({"loss": loss.item()}, save)  # every rank reports: it is a barrier
