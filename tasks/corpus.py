"""Token streams on disk: text -> tokenizer -> flat uint16/uint32 arrays that training memory-maps."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np

from model.errors import InstructflowError
from model.files import atomic_write
from model.tokenizer import Tokenizer


def token_dtype(vocab_size: int) -> np.dtype:
    """uint16 when every id fits (GPT-2's 50,257 do), else uint32."""
    return np.dtype(np.uint16) if vocab_size <= 2**16 else np.dtype(np.uint32)


def write_tokens(ids: list[int] | np.ndarray, path: Path, vocab_size: int) -> Path:
    """Write a flat token array atomically: a crash leaves the old file or none, never half of one."""
    return atomic_write(path, np.asarray(ids, dtype=token_dtype(vocab_size)).tobytes())


def read_tokens(path: Path, vocab_size: int) -> np.ndarray:
    """Memory-map a token file written by `write_tokens`."""
    if not path.is_file():
        raise InstructflowError(f"token file {path} does not exist; run the tokenizer stage first")
    return np.memmap(path, dtype=token_dtype(vocab_size), mode="r")


def paragraphs(text: str) -> list[str]:
    """Cut text before each blank line that follows a non-space character.

    Byte-level BPE never merges across such a cut (a pre-token cannot join a non-space character to the
    newlines after it), so encoding the pieces gives exactly the tokens of the whole text, in parallel and
    about twice as fast as one huge string.
    """
    return re.split(r"(?<=\S)(?=\n\n)", text)


def split_tokens(text: str, tokenizer: Tokenizer, val_fraction: float = 0.1) -> tuple[list[int], list[int]]:
    """Encode `text` and hold out its last `val_fraction` (a contiguous tail, so no window spans both)."""
    if not text.strip():
        raise InstructflowError("the corpus is empty: give it some text")
    ids = [t for part in tokenizer.encode_batch(paragraphs(text)) for t in part]
    cut = int(len(ids) * (1 - val_fraction))
    return ids[:cut], ids[cut:]
