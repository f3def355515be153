"""A tiny chat policy for feedback-round tests: random weights stand in for SFT, with a tokenizer trained on the
built-in verifiable prompts (seconds to build)."""

from __future__ import annotations

from pathlib import Path


def write_tiny_policy(out: Path) -> tuple[str, str]:
    """Write the policy's checkpoint and tokenizer under `out`; returns (checkpoint dir, tokenizer file)."""
    import torch

    from model.checkpoint import save_checkpoint
    from model.config import GPTConfig
    from model.gpt import GPT
    from model.tokenizer import Tokenizer
    from tasks.demonstrations import verifiable_demonstrations

    out.mkdir(parents=True, exist_ok=True)
    demos = verifiable_demonstrations(200, 20)
    tokenizer = Tokenizer.train([f"{d.prompt} {d.response}" for d in demos.train], vocab_size=400)
    tokenizer.save(out / "tokenizer.json")
    torch.manual_seed(0)
    save_checkpoint(GPT(GPTConfig(vocab_size=tokenizer.vocab_size, block_size=64, n_layer=1, n_head=2, n_embd=32,
                                  dropout=0.0)), out / "checkpoint")
    return str(out / "checkpoint"), str(out / "tokenizer.json")
