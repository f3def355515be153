"""A checkpoint is a directory: `model.pt` (weights) + `config.json` (the GPTConfig that rebuilds them).

Writes are atomic: the directory appears complete or not at all.
"""

from __future__ import annotations

import json
import pickle
from pathlib import Path

import torch

from model.config import GPTConfig
from model.errors import InstructflowError
from model.files import atomic_directory
from model.gpt import GPT


def save_checkpoint(model: GPT, directory: str | Path, extra: dict | None = None) -> Path:
    """Write model.pt + config.json (+ extra.pt, e.g. optimiser state) into `directory`, replacing it whole."""
    directory = Path(directory)
    with atomic_directory(directory) as staging:
        torch.save(model.state_dict(), staging / "model.pt")
        (staging / "config.json").write_text(json.dumps(model.config.to_dict(), indent=2))
        if extra is not None:
            torch.save(extra, staging / "extra.pt")
    return directory


def load_checkpoint(directory: str | Path, device: str | torch.device = "cpu") -> tuple[GPT, dict | None]:
    """The model saved in `directory` and its extra state (None if it had none)."""
    directory = Path(directory)
    if not (directory / "model.pt").is_file() or not (directory / "config.json").is_file():
        raise InstructflowError(f"{directory} is not a checkpoint: it needs model.pt and config.json")
    try:
        config = GPTConfig.from_dict(json.loads((directory / "config.json").read_text()))
        state = torch.load(directory / "model.pt", map_location=device, weights_only=True)
    except (json.JSONDecodeError, pickle.UnpicklingError, RuntimeError, EOFError, ValueError) as e:
        raise InstructflowError(f"checkpoint {directory} is unreadable ({e}); delete it and train again") from None
    model = GPT(config).to(device)
    model.load_state_dict(state)
    return model, load_extra(directory / "extra.pt", device)


def load_extra(path: Path, device: str | torch.device = "cpu") -> dict | None:
    """A checkpoint's extra state (optimiser, counters), None when there is none. Tensors and plain values only: a
    file holding any other pickled object is refused, never run (checkpoints travel through shared registries)."""
    if not path.exists():
        return None
    try:
        return torch.load(path, map_location=device, weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError, ValueError) as e:
        raise InstructflowError(f"{path} holds more than tensors and plain values, or is damaged; it is not loaded "
                                f"({str(e).splitlines()[0][:200]}). Use a checkpoint this project wrote") from None
