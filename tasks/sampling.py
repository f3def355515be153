"""K responses per prompt from a policy, batched with the KV cache, spread over Ray tasks; seeds recorded, duplicates dropped.

Each prompt gets K draws; draw j of every prompt uses seed (base_seed, j), so a response can be reproduced
from its row. Identical responses to one prompt are kept once (a ranking of two equal texts says nothing).
"""

from __future__ import annotations

import hashlib

import torch

from model.checkpoint import load_checkpoint
from model.errors import InstructflowError
from model.sft import generate_responses
from model.tokenizer import Tokenizer


def sample_chunk(checkpoint: str, tokenizer_path: str, prompts: list[str], k: int, seed: int, temperature: float,
                 top_p: float | None, max_new_tokens: int | None) -> list[dict]:
    """K draws for each prompt of one chunk (one batched generation per draw)."""
    torch.set_num_threads(1)
    model, _ = load_checkpoint(checkpoint)
    model.eval()
    tokenizer = Tokenizer.load(tokenizer_path)
    rows = []
    for j in range(k):
        draw_seed = int.from_bytes(hashlib.sha256(f"{seed}:{j}".encode()).digest()[:4], "big")
        responses = generate_responses(model, tokenizer, prompts, temperature=temperature, top_p=top_p,
                                       max_new_tokens=max_new_tokens, seed=draw_seed)
        rows += [{"prompt": p, "response": r, "draw": j, "seed": draw_seed} for p, r in zip(prompts, responses)]
    return rows


def dedupe(rows: list[dict]) -> tuple[list[dict], int]:
    """Keep the first copy of each (prompt, response); returns (rows, how many were dropped)."""
    seen, kept = set(), []
    for row in rows:
        key = (row["prompt"], row["response"].strip())
        if key not in seen:
            seen.add(key)
            kept.append(row)
    return kept, len(rows) - len(kept)


def sample_responses(checkpoint: str, tokenizer_path: str, prompts: list[str], k: int, *, seed: int = 0,
                     temperature: float = 1.0, top_p: float | None = None, max_new_tokens: int | None = None,
                     chunks: int | None = None) -> tuple[list[dict], int]:
    """All prompts' K draws as Ray tasks (one per chunk of prompts); returns (deduplicated rows, duplicates dropped)."""
    import ray

    from tasks.ray_train import ensure_ray

    if not prompts:
        raise InstructflowError("no prompts to sample responses for")
    if k < 1:
        raise InstructflowError(f"k must be at least 1, got {k}")
    ensure_ray()
    chunks = max(1, min(len(prompts), chunks or int(ray.cluster_resources().get("CPU", 1))))
    remote = ray.remote(num_cpus=1)(sample_chunk)
    size = -(-len(prompts) // chunks)
    futures = [remote.remote(checkpoint, tokenizer_path, prompts[i:i + size], k, seed, temperature, top_p,
                             max_new_tokens) for i in range(0, len(prompts), size)]
    rows = [row for chunk in ray.get(futures) for row in chunk]
    order = {p: i for i, p in enumerate(prompts)}
    rows.sort(key=lambda r: (order[r["prompt"]], r["draw"]))
    return dedupe(rows)
