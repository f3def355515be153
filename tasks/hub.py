"""Released GPT weights (a hub name or a local transformers directory) as an instructflow checkpoint + tokenizer."""

from __future__ import annotations

from pathlib import Path

from model.checkpoint import save_checkpoint
from model.errors import InstructflowError
from model.hf import from_pretrained
from model.tokenizer import Tokenizer
from tasks.carriers import gpt2_ranks_file


def import_gpt2(name: str, out: Path) -> tuple[Path, Path]:
    """Write `out/checkpoint/` (model.pt + config.json) and `out/tokenizer.json` (GPT-2's exact encoding).

    `name` is a hub name ("gpt2", "gpt2-medium", ...) where a hub is reachable, or a directory written by
    transformers' `save_pretrained`. The tokenizer is rebuilt offline from GPT-2's ranks file.
    """
    model = from_pretrained(name)
    if model.config.vocab_size != 50257:
        raise InstructflowError(f"{name} has a vocabulary of {model.config.vocab_size}, not GPT-2's 50,257; "
                                "only GPT-2-encoded models get the GPT-2 tokenizer")
    out = Path(out)
    checkpoint = save_checkpoint(model, out / "checkpoint")
    tokenizer = out / "tokenizer.json"
    Tokenizer.gpt2(gpt2_ranks_file()).save(tokenizer)
    return checkpoint, tokenizer
