"""Device and precision, chosen in this one place: CUDA with bf16 autocast where a GPU exists, else CPU in fp32."""

from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass
from functools import partial

import torch


@dataclass(frozen=True)
class Runtime:
    device: torch.device
    dtype: torch.dtype  # the autocast dtype; fp32 means no autocast

    def autocast(self):
        """A context for forward passes: bf16 autocast on GPU, nothing on CPU (bf16 is ~4x slower there)."""
        if self.dtype == torch.float32:
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.device.type, dtype=self.dtype)

    @property
    def autocast_factory(self):
        return partial(Runtime.autocast, self)


def choose_runtime(prefer: str | None = None) -> Runtime:
    """CUDA + bf16 if available (or `prefer="cuda"`), else CPU + fp32; `prefer="cpu"` forces the CPU."""
    if prefer != "cpu" and torch.cuda.is_available():
        bf16 = torch.cuda.is_bf16_supported()
        return Runtime(torch.device("cuda"), torch.bfloat16 if bf16 else torch.float32)
    return Runtime(torch.device("cpu"), torch.float32)


def matmul_peak_flops(device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32, n: int = 2048,
                      repeats: int = 10) -> float:
    """Best FLOP/s of an n x n matmul on this device: the roof that MFU is measured against."""
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    sync = torch.cuda.synchronize if torch.device(device).type == "cuda" else (lambda: None)
    a @ b  # warm up
    sync()
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        a @ b
        sync()
        best = min(best, time.perf_counter() - start)
    return 2 * n**3 / best
