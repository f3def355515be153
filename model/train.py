"""The plain, single-process causal-LM training loop (objective L1 of GPT-1 §3.1), reporting through a callback.

AdamW with decoupled weight decay on matrices only, linear warmup then cosine decay, gradient clipping and
gradient accumulation. Distribution, tracking and checkpoint storage are added by the caller (tasks/).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass, field

import numpy as np
import torch

from model.config import TrainDefaults, flops_per_token
from model.errors import InstructflowError
from model.gpt import GPT


@dataclass
class TrainConfig:
    max_steps: int = 200
    batch_size: int = 16  # sequences per micro-batch
    seq_len: int = 256
    grad_accum: int = 1  # micro-batches per optimiser step
    learning_rate: float = 1e-3
    warmup_steps: int = 20
    min_lr_ratio: float = 0.1  # cosine decays to learning_rate * min_lr_ratio at max_steps
    weight_decay: float = 0.1
    betas: tuple[float, float] = (0.9, 0.95)
    grad_clip: float | None = 1.0
    eval_every: int = 50
    eval_batches: int = 8
    log_every: int = 10
    seed: int = 1337
    max_seconds: float | None = None  # stop early after this much wall time (demos); None = run max_steps
    peak_flops: float | None = None  # the device's measured peak FLOP/s, for MFU

    @property
    def tokens_per_step(self) -> int:
        return self.batch_size * self.seq_len * self.grad_accum

    @classmethod
    def from_defaults(cls, defaults: TrainDefaults, seq_len: int, batch_size: int, **overrides) -> TrainConfig:
        """Scale a paper's token-denominated defaults to this batch shape (grad_accum reaches batch_tokens)."""
        grad_accum = max(1, round(defaults.batch_tokens / (batch_size * seq_len)))
        tokens_per_step = batch_size * seq_len * grad_accum
        values = dict(
            batch_size=batch_size, seq_len=seq_len, grad_accum=grad_accum, learning_rate=defaults.learning_rate,
            warmup_steps=math.ceil(defaults.warmup_tokens / tokens_per_step), min_lr_ratio=defaults.min_lr_ratio,
            weight_decay=defaults.weight_decay, betas=defaults.betas, grad_clip=defaults.grad_clip,
        )
        values.update(overrides)
        return cls(**values)


def lr_at(step: int, peak: float, *, warmup_steps: int = 0, warmup_start: float | None = None,
          decay: str = "cosine", total_steps: int | None = None, min_ratio: float = 0.0) -> float:
    """The learning rate at `step` (counted from 0) of every loop in model/: a linear warmup, then a decay from `peak`.

    Warmup over the first `warmup_steps` steps: with `warmup_start` None, step k gets (k + 1) / warmup_steps of the
    peak (nanoGPT's ramp: the peak at the last warmup step); with a fraction, the ramp goes from warmup_start * peak
    at step 0 to the peak at step warmup_steps (InstructGPT C.4's PPO warmup from a tenth).
    After it, `decay` from step warmup_steps to `total_steps`, to a floor of min_ratio * peak:
      "cosine"   half a cosine down to the floor (GPT-3, InstructGPT C.1/C.2), the floor after total_steps;
      "linear"   a straight line down to the floor at total_steps (GPT-1 §4.1's fine-tuning, floor 0);
      "constant" the peak for good (InstructGPT C.4's PPO).
    """
    if step < warmup_steps:
        if warmup_start is None:
            return peak * (step + 1) / warmup_steps
        return peak * (warmup_start + (1 - warmup_start) * step / warmup_steps)
    if decay == "constant":
        return peak
    floor = peak * min_ratio
    if decay == "linear":
        return floor + (peak - floor) * max(0.0, (total_steps - step) / max(1, total_steps - warmup_steps))
    if decay != "cosine":
        raise ValueError(f"decay must be 'cosine', 'linear' or 'constant', got {decay!r}")
    progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
    return floor + 0.5 * (1 + math.cos(math.pi * progress)) * (peak - floor)


def make_optimizer(model: torch.nn.Module, cfg: TrainConfig) -> torch.optim.AdamW:
    """AdamW; weight decay on matrices (weights, embeddings) only, not on biases and LayerNorm gains."""
    params = [p for p in model.parameters() if p.requires_grad]
    decay = [p for p in params if p.dim() >= 2]
    no_decay = [p for p in params if p.dim() < 2]
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    # the fused kernel updates every tensor in one call: ~1 ms a step for the tiny model on CPU against 4-8 ms for
    # the per-tensor loop, which PPO's 16 minibatch updates per rollout batch pay twice (policy and value)
    fused = all(p.device.type in ("cpu", "cuda") for p in params)
    return torch.optim.AdamW(groups, lr=cfg.learning_rate, betas=cfg.betas, fused=fused)


def batch_at(tokens: np.ndarray, step: int, micro: int, cfg: TrainConfig, stream: int = 0, rank: int = 0):
    """The (inputs, targets) micro-batch for a given step, each (B, seq_len): random windows, fixed by the seed.

    A batch depends only on (seed, stream, step, micro, rank): a resumed run continues with exactly the data
    it would have seen (the data position is the step), and each data-parallel rank draws its own windows.
    Stream 0 is training data, stream 1 the fixed evaluation batches.
    """
    if len(tokens) <= cfg.seq_len + 1:
        raise InstructflowError(
            f"the token stream has {len(tokens)} tokens, fewer than one context window of {cfg.seq_len} + 1: "
            f"use more text or a shorter seq_len"
        )
    rng = np.random.default_rng([cfg.seed, stream, step, micro, rank])
    starts = rng.integers(0, len(tokens) - cfg.seq_len - 1, size=cfg.batch_size)
    window = np.stack([tokens[s:s + cfg.seq_len + 1] for s in starts]).astype(np.int64)  # (B, T + 1)
    data = torch.from_numpy(window)
    return data[:, :-1], data[:, 1:]


@torch.no_grad()
def evaluate_loss(model: GPT, tokens: np.ndarray, cfg: TrainConfig, device, autocast) -> float:
    """Mean loss over cfg.eval_batches fixed batches of held-out tokens."""
    was_training = model.training
    model.eval()
    losses = []
    for n in range(cfg.eval_batches):
        x, y = batch_at(tokens, 0, n, cfg, stream=1)
        with autocast():
            _, loss = model(x.to(device), y.to(device))
        losses.append(loss.item())
    model.train(was_training)
    return sum(losses) / len(losses)


@dataclass
class TrainState:
    step: int = 0  # optimiser steps done
    tokens_seen: int = 0
    history: list[dict] = field(default_factory=list)  # every logged metrics dict, with its step


def train(
    model: GPT,
    train_tokens: np.ndarray,
    val_tokens: np.ndarray | None,
    cfg: TrainConfig,
    *,
    log: Callable[[dict, int], None] = lambda metrics, step: None,
    state: TrainState | None = None,
    optimizer: torch.optim.Optimizer | None = None,
    on_step_end: Callable[[TrainState], None] | None = None,
    autocast=None,
    rank: int = 0,
) -> TrainState:
    """Train from `state` (a fresh one by default) to cfg.max_steps; metrics go to `log(metrics, step)`.

    `on_step_end` runs after every optimiser step (the caller's checkpoint hook). The model may be wrapped
    (DDP, torch.compile); `autocast` is a no-argument context factory (bf16 on GPU) chosen by the caller;
    `rank` selects this data-parallel worker's share of each step's batches.
    """
    autocast = autocast or nullcontext
    device = next(model.parameters()).device
    state = state or TrainState()
    optimizer = optimizer or make_optimizer(model, cfg)
    core = getattr(model, "module", model)  # under DDP the GPT is model.module
    flops = flops_per_token(core.config, core.num_params(non_embedding=True), cfg.seq_len)
    model.train()
    started, window_tokens, window_start = time.perf_counter(), 0, time.perf_counter()
    while state.step < cfg.max_steps:
        lr = lr_at(state.step, cfg.learning_rate, warmup_steps=cfg.warmup_steps, total_steps=cfg.max_steps,
                   min_ratio=cfg.min_lr_ratio)
        for group in optimizer.param_groups:
            group["lr"] = lr
        total = 0.0
        for micro in range(cfg.grad_accum):
            x, y = batch_at(train_tokens, state.step, micro, cfg, rank=rank)
            with autocast():
                _, loss = model(x.to(device), y.to(device))
            (loss / cfg.grad_accum).backward()
            total += loss.item() / cfg.grad_accum
        if not math.isfinite(total):
            raise FloatingPointError(f"training loss became {total} at step {state.step}; lower the learning rate")
        grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip or float("inf"))
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        state.step += 1
        state.tokens_seen += cfg.tokens_per_step
        window_tokens += cfg.tokens_per_step
        last = state.step == cfg.max_steps or (
            cfg.max_seconds is not None and time.perf_counter() - started >= cfg.max_seconds
        )
        if state.step % cfg.log_every == 0 or state.step == 1 or last:
            elapsed = time.perf_counter() - window_start
            metrics = {"loss": total, "lr": lr, "grad_norm": float(grad_norm), "tokens_per_s": window_tokens / elapsed}
            if cfg.peak_flops:
                metrics["mfu"] = flops * window_tokens / elapsed / cfg.peak_flops
            if val_tokens is not None and (state.step % cfg.eval_every == 0 or last):
                metrics["val_loss"] = evaluate_loss(model, val_tokens, cfg, device, autocast)
            state.history.append({"step": state.step, **metrics})
            log(metrics, state.step)
            window_tokens, window_start = 0, time.perf_counter()
        if on_step_end is not None:
            on_step_end(state)
        if last:
            break
    return state
