"""Token streams: exact paragraph-parallel encoding, dtype choice, atomic writes."""

import numpy as np
import pytest

from model.errors import InstructflowError
from tasks.corpus import paragraphs, read_tokens, split_tokens, token_dtype, write_tokens


def test_paragraph_encoding_equals_whole_text_encoding(gpt2_tokenizer, tiny_shakespeare):
    text = tiny_shakespeare.read_text(encoding="utf-8")[:200_000]
    text += "\n\ntrailing  \n\n\n spaces\t\n\nand 12\n\n34 digits!\n\n"
    assert len(paragraphs(text)) > 100
    train, val = split_tokens(text, gpt2_tokenizer, val_fraction=0.25)
    assert train + val == gpt2_tokenizer.encode(text)
    assert len(val) == len(train + val) - int(len(train + val) * 0.75)


def test_token_files_round_trip_and_pick_their_dtype(tmp_path):
    assert token_dtype(50257) == np.uint16 and token_dtype(100_000) == np.uint32
    path = write_tokens([1, 50256, 7], tmp_path / "t.bin", 50257)
    assert path.stat().st_size == 6
    assert read_tokens(path, 50257).tolist() == [1, 50256, 7]
    assert [p.name for p in tmp_path.iterdir()] == ["t.bin"]
    with pytest.raises(InstructflowError, match="does not exist"):
        read_tokens(tmp_path / "missing.bin", 50257)


def test_empty_corpus_is_a_clear_error(gpt2_tokenizer):
    with pytest.raises(InstructflowError, match="corpus is empty"):
        split_tokens(" \n ", gpt2_tokenizer)
