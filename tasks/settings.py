"""Where instructflow keeps its state, read from the environment in this one place.

Everything a run writes lives under one state directory (default `.instructflow/` in the checkout,
overridable with INSTRUCTFLOW_STATE_DIR). Deleting it resets the machine; nothing is written to `~`.
"""

from __future__ import annotations

import os
from pathlib import Path

CHECKOUT = Path(__file__).resolve().parents[1]


def state_dir() -> Path:
    """The state directory, created on first use."""
    path = Path(os.environ.get("INSTRUCTFLOW_STATE_DIR") or CHECKOUT / ".instructflow").resolve()
    path.mkdir(parents=True, exist_ok=True)
    return path


def cache_dir() -> Path:
    """Downloaded carrier packages and files extracted from them (safe to delete; refetched on demand)."""
    path = state_dir() / "cache"
    path.mkdir(parents=True, exist_ok=True)
    return path
