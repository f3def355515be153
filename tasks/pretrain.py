"""Pretraining on this machine: the plain loop from model/ on the best local device, ending in a checkpoint."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from model.checkpoint import load_checkpoint, save_checkpoint
from model.config import GPTConfig
from model.generate import generate
from model.gpt import GPT
from model.tokenizer import Tokenizer
from model.train import TrainConfig, TrainState, train
from tasks.runtime import choose_runtime


def pretrain_local(
    train_tokens: np.ndarray,
    val_tokens: np.ndarray,
    config: GPTConfig,
    cfg: TrainConfig,
    checkpoint_dir: Path,
    log: Callable[[dict, int], None],
) -> TrainState:
    """Train a fresh GPT and save it to `checkpoint_dir` (model.pt + config.json)."""
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
    out = generate(model, encoded, max_new_tokens, temperature=0.8, top_k=50, seed=seed,
                   stop_tokens=[tokenizer.eot_id], pad_token=tokenizer.eot_id)
    return [p + tokenizer.decode([t for t in o if t != tokenizer.eot_id]) for p, o in zip(prompts, out)]
