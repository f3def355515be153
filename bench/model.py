"""Model benchmarks: training throughput and FLOP utilisation, and generation speed with and without the KV cache.

Run with `make bench`. Prints a table and writes the same figures to <state dir>/bench/model.json.
Figures are wall-clock on this machine; compare runs on the same machine only.
"""

from __future__ import annotations

import json
import platform
import time

import torch

from model.config import GPTConfig, config_for, flops_per_token
from model.generate import generate
from model.gpt import GPT
from model.train import TrainConfig, make_optimizer
from tasks.runtime import choose_runtime, matmul_peak_flops
from tasks.settings import state_dir


def train_throughput(config: GPTConfig, batch_size: int, seq_len: int, steps: int, peak: float) -> dict:
    """Tokens/s of full training steps (forward, backward, AdamW) after one warm-up step."""
    torch.manual_seed(0)
    model = GPT(config)
    optimizer = make_optimizer(model, TrainConfig())
    x = torch.randint(0, config.vocab_size, (batch_size, seq_len))

    def step():
        _, loss = model(x, x)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    step()
    start = time.perf_counter()
    for _ in range(steps):
        step()
    seconds = (time.perf_counter() - start) / steps
    tokens_per_s = batch_size * seq_len / seconds
    achieved = flops_per_token(config, model.num_params(non_embedding=True), seq_len) * tokens_per_s
    return {"params_m": model.num_params() / 1e6, "batch": f"{batch_size}x{seq_len}", "step_s": seconds,
            "tokens_per_s": tokens_per_s, "gflops": achieved / 1e9, "mfu": achieved / peak}


def generation_speed(config: GPTConfig, batch_size: int, prompt_len: int, new_tokens: int) -> dict:
    """New tokens/s (all sequences together), sampling greedily so both paths do identical work."""
    torch.manual_seed(0)
    model = GPT(config).eval()
    prompts = torch.randint(0, config.vocab_size, (batch_size, prompt_len)).tolist()
    result = {}
    for use_cache in (True, False):
        generate(model, prompts, 2, temperature=0.0, use_cache=use_cache)  # warm up
        start = time.perf_counter()
        out = generate(model, prompts, new_tokens, temperature=0.0, use_cache=use_cache)
        seconds = time.perf_counter() - start
        result["cached" if use_cache else "naive"] = sum(len(o) for o in out) / seconds
    result["speedup"] = result["cached"] / result["naive"]
    result["shape"] = f"{batch_size}x({prompt_len}+{new_tokens})"
    return result


def main() -> None:
    runtime = choose_runtime()
    if runtime.device.type != "cpu":
        print(f"note: this benchmark measures the CPU path; a {runtime.device} was found but is not used here")
    torch.set_grad_enabled(True)
    peak = matmul_peak_flops()
    tiny = config_for("tiny")
    gpt2_small = config_for("gpt2", dropout=0.0)
    print(f"fp32 matmul peak (2048^2): {peak / 1e9:.0f} GFLOP/s on {torch.get_num_threads()} threads\n")
    training = {
        "tiny": train_throughput(tiny, 16, 256, steps=20, peak=peak),
        "gpt2 (124M)": train_throughput(gpt2_small, 4, 256, steps=3, peak=peak),
    }
    print(f"{'training':<14}{'params':>9}{'batch':>10}{'step s':>9}{'tokens/s':>11}{'GFLOP/s':>10}{'MFU':>7}")
    for name, r in training.items():
        print(f"{name:<14}{r['params_m']:>8.1f}M{r['batch']:>10}{r['step_s']:>9.3f}{r['tokens_per_s']:>11.0f}"
              f"{r['gflops']:>10.1f}{r['mfu']:>7.1%}")
    with torch.no_grad():
        generation = {
            "tiny": generation_speed(tiny, 8, 32, 200),
            "gpt2 (124M)": generation_speed(gpt2_small, 4, 32, 48),
        }
    print(f"\n{'generation':<14}{'shape':>14}{'cached tok/s':>14}{'naive tok/s':>13}{'speedup':>9}")
    for name, r in generation.items():
        print(f"{name:<14}{r['shape']:>14}{r['cached']:>14.0f}{r['naive']:>13.0f}{r['speedup']:>8.1f}x")
    out = state_dir() / "bench" / "model.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    report = {"machine": platform.processor() or platform.machine(), "threads": torch.get_num_threads(),
              "torch": torch.__version__, "matmul_peak_gflops": peak / 1e9, "training": training,
              "generation": generation}
    out.write_text(json.dumps(report, indent=2))
    print(f"\nwritten to {out}")


if __name__ == "__main__":
    main()
