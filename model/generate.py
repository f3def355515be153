"""Sampling from a GPT: batched, left-padded prompts, a KV cache, temperature / top-k / top-p, stop tokens, seeds.

`generate(..., use_cache=False)` is the naive reference: it re-reads the whole sequence every step. Tests prove
that both paths give identical tokens.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from model.errors import InstructflowError
from model.gpt import GPT


def filter_logits(logits: torch.Tensor, top_k: int | None = None, top_p: float | None = None) -> torch.Tensor:
    """Set to -inf every logit outside the top-k and outside the smallest set whose probability reaches top-p."""
    if top_k is not None and top_k < logits.size(-1):
        kth = torch.topk(logits, top_k, dim=-1).values[..., -1:]  # (B, 1)
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None and top_p < 1.0:
        sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
        cumulative = sorted_logits.softmax(-1).cumsum(-1)
        drop_sorted = cumulative - sorted_logits.softmax(-1) >= top_p  # mass before this token already reaches top-p
        drop = drop_sorted.scatter(-1, order, drop_sorted)
        logits = logits.masked_fill(drop, float("-inf"))
    return logits


def sample_next(
    logits: torch.Tensor,
    temperature: float,
    top_k: int | None,
    top_p: float | None,
    generator: torch.Generator | None,
) -> torch.Tensor:
    """Next token ids (B,) from last-position logits (B, vocab); temperature 0 is greedy."""
    if temperature == 0:
        return logits.argmax(-1)
    probs = filter_logits(logits.float() / temperature, top_k, top_p).softmax(-1)
    return categorical(probs, generator)


def categorical(probs: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """One draw per row of probs (B, vocab) by inverting its CDF: one uniform number per row.

    torch.multinomial draws one exponential number per vocabulary entry: at a 4,096-token vocabulary that was 40%
    of a generation step on CPU. side="right" never returns a token of probability 0 (its CDF equals its left
    neighbour's); the clamp only guards float rounding at u -> 1.
    """
    cdf = probs.double().cumsum(-1)
    u = torch.rand((*probs.shape[:-1], 1), generator=generator, device=probs.device, dtype=cdf.dtype)
    return torch.searchsorted(cdf, u * cdf[..., -1:], side="right").squeeze(-1).clamp_(max=probs.size(-1) - 1)


def _check(model: GPT, prompts, max_new_tokens, temperature, top_k, top_p) -> None:
    if not prompts:
        raise InstructflowError("no prompts given: pass a list of token-id lists")
    for n, prompt in enumerate(prompts):
        if len(prompt) == 0:
            raise InstructflowError(f"prompt {n} is empty: a prompt needs at least one token (e.g. <|endoftext|>)")
    longest = max(len(p) for p in prompts)
    if longest + max_new_tokens > model.config.block_size:
        raise InstructflowError(
            f"the longest prompt ({longest} tokens) plus max_new_tokens={max_new_tokens} exceeds the model's context "
            f"of {model.config.block_size}; shorten the prompt or ask for fewer tokens"
        )
    if max_new_tokens < 1:
        raise InstructflowError(f"max_new_tokens must be at least 1, got {max_new_tokens}")
    if temperature < 0:
        raise InstructflowError(f"temperature must be >= 0 (0 = greedy), got {temperature}")
    if top_k is not None and top_k < 1:
        raise InstructflowError(f"top_k must be at least 1, got {top_k}")
    if top_p is not None and not 0 < top_p <= 1:
        raise InstructflowError(f"top_p must be in (0, 1], got {top_p}")


@torch.no_grad()
def generate(
    model: GPT,
    prompts: Sequence[Sequence[int]],
    max_new_tokens: int,
    *,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
    stop_tokens: Sequence[int] = (),
    pad_token: int = 0,
    seed: int | None = None,
    use_cache: bool = True,
) -> list[list[int]]:
    """Continue each prompt; returns the new tokens per prompt, ending with the stop token if one was sampled.

    Prompts of different lengths are left-padded into one batch; padding is masked out and does not count
    as a position. A sequence stops at its first stop token; generation ends when all have stopped.
    """
    _check(model, prompts, max_new_tokens, temperature, top_k, top_p)
    device = model.wte.weight.device
    B, P = len(prompts), max(len(p) for p in prompts)
    idx = torch.full((B, P), pad_token, dtype=torch.long, device=device)
    mask = torch.zeros((B, P), dtype=torch.long, device=device)
    for b, prompt in enumerate(prompts):
        idx[b, P - len(prompt):] = torch.tensor(prompt, dtype=torch.long, device=device)
        mask[b, P - len(prompt):] = 1
    generator = torch.Generator(device).manual_seed(seed) if seed is not None else None
    stops = torch.tensor(list(stop_tokens), dtype=torch.long, device=device)
    done = torch.zeros(B, dtype=torch.bool, device=device)
    cache = model.new_cache(B, P + max_new_tokens) if use_cache else None
    was_training = model.training
    model.eval()
    new_tokens = []
    step_input = idx
    for _ in range(max_new_tokens):
        hidden = model.hidden_states(step_input, attention_mask=mask, cache=cache)  # (B, T, C)
        logits = model.lm_head(hidden[:, -1, :])  # (B, vocab): only the last position is sampled from
        token = sample_next(logits, temperature, top_k, top_p, generator)  # (B,)
        token = token.masked_fill(done, pad_token)  # finished sequences only pad
        new_tokens.append(token)
        done |= torch.isin(token, stops)
        if done.all():
            break
        idx = torch.cat([idx, token[:, None]], dim=1)
        mask = torch.cat([mask, torch.ones_like(token)[:, None]], dim=1)
        step_input = token[:, None] if use_cache else idx
    model.train(was_training)
    out = torch.stack(new_tokens, dim=1).tolist()  # (B, steps)
    stop_set = set(stop_tokens)
    results = []
    for row in out:
        end = next((n + 1 for n, t in enumerate(row) if t in stop_set), len(row))
        results.append(row[:end])
    return results
