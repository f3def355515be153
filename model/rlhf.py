"""InstructGPT step 3, the PPO loop (Ouyang et al. 2022, §3.5 "Reinforcement learning", Appendix C.4): rollouts from
the policy, KL-shaped rewards from the reward model, clipped PPO updates of the policy and the value function.

    objective(φ) = E_(x,y)~π_φ [ r_θ(x, y) − β log(π_φ(y|x) / π_SFT(y|x)) ] + γ_ptx · E_x~D_pretrain [ log π_φ(x) ]

The policy starts as the SFT model; the reference π_SFT is a frozen copy; the value function starts as the reward
model (C.4: "we initialize the value function from the RM"). The math (GAE, whitening, clipped losses, KL
estimators and controllers) is in model/ppo.py; this file is the loop, numbered like the algorithm box of
lm-human-preference-details:
  1. generate   K = 1 response per prompt from the current policy (sampling at temperature T, no top-k/top-p, so
                the sampled distribution is the one whose log-probabilities are scored)
  2. score      policy, reference and value forward passes over prompt + response; the reward model reads the last
                token; a response that never stopped is penalised
  3. rewards    −β·KL per token, plus the score on the last token
  4. advantages GAE (γ = 1, λ = 0.95), whitened over the batch
  5. PPO epochs minibatches of the batch; clipped policy loss, clipped value loss, optional pretraining LM loss
  6. bookkeeping adaptive KL coefficient, EMA of the policy weights, metrics, guards

Layout of a scored batch: prompts left-padded to P tokens, responses right-padded to R tokens, one (B, P + R) tensor
with an attention mask; the logits at positions P − 1 ... P + R − 2 predict the R response tokens.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from contextlib import nullcontext
from dataclasses import dataclass, field

import torch
import torch.distributed as dist

from model.errors import InstructflowError
from model.generate import generate
from model.gpt import GPT
from model.ppo import (EMA, check_finite, check_kl, entropy_from_logits, gae, kl_controller, logprobs_from_logits,
                       masked_mean, missing_end_penalty, policy_loss, shaped_rewards, value_loss, whiten)
from model.reward import RewardModel
from model.train import lr_at


@dataclass
class PPOConfig:
    """InstructGPT's PPO settings (Appendix C.4) where they carry over; sizes scaled down for small runs.

    C.4: batch 512 episodes, minibatch 64 (8 minibatches), 1 PPO epoch per batch, β = 0.02, γ_ptx = 27.8 for PPO-ptx,
    EMA decay 0.992, no discount (γ = 1) and λ = 0.95 for GAE, a constant learning rate after a 10-iteration warmup
    from a tenth of it (9e-6 at 1.3B/6B; tiny models want ~1e-4). Clip 0.2 is PPO's (Schulman et al. 2017).
    """
    total_episodes: int = 256_000  # prompts answered over the run (C.4: 256k episodes)
    batch_size: int = 512  # episodes per rollout batch, all workers together
    mini_batches: int = 8  # each batch is split into this many minibatch updates per PPO epoch
    ppo_epochs: int = 1
    learning_rate: float = 9e-6
    value_learning_rate: float | None = None  # None: the policy's
    warmup_iterations: int = 10
    beta: float = 0.02  # the KL coefficient (initial, when adaptive)
    kl_target: float | None = None  # None: β is fixed; else Ziegler et al.'s adaptive controller aims at this KL
    kl_horizon: int = 10_000
    kl_estimator: str = "k1"
    gamma: float = 1.0
    lam: float = 0.95
    clip_range: float = 0.2
    clip_range_value: float = 0.2
    value_coef: float = 0.1  # weight of the value loss beside the policy loss
    ptx_coef: float = 0.0  # PPO-ptx: γ_ptx (InstructGPT 27.8); 0 = plain PPO
    ptx_batch_size: int = 8  # pretraining sequences per minibatch (per worker)
    ptx_seq_len: int = 128
    ema_decay: float | None = None  # InstructGPT 0.992; the saved policy is then the EMA
    max_new_tokens: int = 64
    temperature: float = 1.0
    missing_end_penalty: float | None = 1.0  # subtracted from the score of a response that never stopped
    weight_decay: float = 0.0
    betas: tuple[float, float] = (0.9, 0.95)
    grad_clip: float | None = 1.0
    collapse_patience: int = 3  # iterations in a row with (almost) identical scores before the run is stopped
    log_every: int = 1
    seed: int = 0

    def __post_init__(self) -> None:
        for name in ("total_episodes", "batch_size", "mini_batches", "ppo_epochs", "max_new_tokens",
                     "collapse_patience", "log_every", "ptx_batch_size", "ptx_seq_len"):
            if getattr(self, name) < 1:
                raise InstructflowError(f"PPOConfig.{name} must be at least 1, got {getattr(self, name)}")
        if self.batch_size % self.mini_batches:
            raise InstructflowError(f"PPOConfig.batch_size={self.batch_size} is not a multiple of "
                                    f"mini_batches={self.mini_batches}")
        if self.total_episodes < self.batch_size:
            raise InstructflowError(f"PPOConfig.total_episodes={self.total_episodes} is less than one batch of "
                                    f"{self.batch_size}")
        if self.temperature <= 0:
            raise InstructflowError("PPOConfig.temperature must be > 0: PPO samples its rollouts (greedy decoding "
                                    "has no log-probabilities to ratio)")
        if self.ptx_coef < 0 or self.value_coef < 0:
            raise InstructflowError("PPOConfig.ptx_coef and value_coef must be >= 0")
        kl_controller(self.beta, self.kl_target, self.kl_horizon)  # checks beta and the target

    @property
    def iterations(self) -> int:
        return self.total_episodes // self.batch_size

    def local_batch(self, world_size: int) -> int:
        if self.batch_size % (world_size * self.mini_batches):
            raise InstructflowError(f"PPOConfig.batch_size={self.batch_size} does not split into {self.mini_batches} "
                                    f"minibatches on each of {world_size} workers; use a multiple of "
                                    f"{world_size * self.mini_batches}")
        return self.batch_size // world_size


# --- rollouts ------------------------------------------------------------------------------------


@dataclass
class Rollout:
    """One scored batch (see the module docstring for the layout). Per-token tensors are (B, R)."""
    idx: torch.Tensor  # (B, P + R) token ids
    attention_mask: torch.Tensor  # (B, P + R) 0 on left padding of prompts and right padding of responses
    prompt_len: int  # P
    mask: torch.Tensor  # (B, R) float, 1 on response tokens
    ended: torch.Tensor  # (B,) bool: the response ends with a stop token
    logprobs: torch.Tensor | None = None  # (B, R) under the policy that sampled
    ref_logprobs: torch.Tensor | None = None  # (B, R) under the reference (SFT)
    values: torch.Tensor | None = None  # (B, R)
    scores: torch.Tensor | None = None  # (B,) reward-model score (with the missing-end penalty)
    raw_scores: torch.Tensor | None = None  # (B,) reward-model score alone

    def select(self, rows: torch.Tensor) -> Rollout:
        """These rows, without the columns that are padding in all of them: the prompt columns left of their
        longest prompt and the response columns right of their longest response (R shrinks to that response).
        Positions count real tokens only and attention is causal, so every remaining value is unchanged."""
        real = self.attention_mask[rows].bool()
        first = int(real[:, :self.prompt_len].any(0).long().argmax())  # first prompt column holding a token
        R = max(1, int(self.mask[rows].sum(1).max()))
        keep = slice(first, self.prompt_len + R)
        pick = lambda t: None if t is None else t[rows][:, :R]  # noqa: E731  per-token (B, R) tensors
        whole = lambda t: None if t is None else t[rows]  # noqa: E731  per-sequence (B,) tensors
        return Rollout(self.idx[rows][:, keep], self.attention_mask[rows][:, keep], self.prompt_len - first,
                       self.mask[rows][:, :R], self.ended[rows], pick(self.logprobs), pick(self.ref_logprobs),
                       pick(self.values), whole(self.scores), whole(self.raw_scores))


def lay_out(queries: Sequence[Sequence[int]], responses: Sequence[Sequence[int]], pad: int,
            stop_tokens: Sequence[int], device=None) -> Rollout:
    """Left-padded queries + right-padded responses as one batch (an empty response keeps one padding slot)."""
    B, P = len(queries), max(len(q) for q in queries)
    R = max(1, max(len(r) for r in responses))
    idx = torch.full((B, P + R), pad, dtype=torch.long)
    attention = torch.zeros((B, P + R), dtype=torch.long)
    mask = torch.zeros((B, R))
    ended = torch.zeros(B, dtype=torch.bool)
    for b, (q, r) in enumerate(zip(queries, responses)):
        idx[b, P - len(q):P] = torch.tensor(q, dtype=torch.long)
        attention[b, P - len(q):P + len(r)] = 1
        if r:
            idx[b, P:P + len(r)] = torch.tensor(r, dtype=torch.long)
            mask[b, :len(r)] = 1
            ended[b] = r[-1] in stop_tokens
    return Rollout(idx.to(device), attention.to(device), P, mask.to(device), ended.to(device))


def response_logits(model: GPT, batch: Rollout, temperature: float) -> torch.Tensor:
    """Logits (B, R, vocab) for the response tokens, divided by the sampling temperature (so they score the
    distribution the tokens were drawn from)."""
    logits, _ = model(batch.idx, attention_mask=batch.attention_mask)  # (B, P + R, vocab); through forward for DDP
    P = batch.prompt_len
    return logits[:, P - 1:-1].float() / temperature


def response_values(value: RewardModel, batch: Rollout) -> torch.Tensor:
    """V(s_t) before each response token, (B, R)."""
    P = batch.prompt_len
    return value(batch.idx, attention_mask=batch.attention_mask)[:, P - 1:-1]


def reward_scores(reward: RewardModel, batch: Rollout) -> torch.Tensor:
    """The reward model's score (B,) read at each sequence's last real token (prompt + response)."""
    last = batch.prompt_len + batch.mask.sum(1).long() - 1  # (B,)
    return reward(batch.idx, attention_mask=batch.attention_mask).gather(1, last.view(-1, 1)).squeeze(1)


@torch.no_grad()
def rollout(policy: GPT, ref: GPT, value: RewardModel, reward: RewardModel, queries: Sequence[Sequence[int]],
            cfg: PPOConfig, *, pad: int, stop_tokens: Sequence[int], seed: int, autocast=None,
            timings: dict | None = None) -> Rollout:
    """1. generate and 2. score one batch of prompts (token ids of rendered prompts)."""
    autocast = autocast or nullcontext
    timings = timings if timings is not None else {}
    device = policy.wte.weight.device
    started = time.perf_counter()
    with autocast():
        responses = generate(policy, queries, cfg.max_new_tokens, temperature=cfg.temperature,
                             stop_tokens=stop_tokens, pad_token=pad, seed=seed)
    timings["generation"] = timings.get("generation", 0.0) + time.perf_counter() - started
    started = time.perf_counter()
    batch = lay_out(queries, responses, pad, stop_tokens, device)
    with autocast():
        batch.logprobs = logprobs_from_logits(response_logits(policy, batch, cfg.temperature), batch.idx[:, batch.prompt_len:])
        batch.ref_logprobs = logprobs_from_logits(response_logits(ref, batch, cfg.temperature), batch.idx[:, batch.prompt_len:])
        batch.values = response_values(value, batch).float()
        batch.raw_scores = reward_scores(reward, batch).float()
    batch.logprobs, batch.ref_logprobs = batch.logprobs * batch.mask, batch.ref_logprobs * batch.mask
    batch.values = batch.values * batch.mask
    batch.scores = batch.raw_scores
    if cfg.missing_end_penalty is not None:
        batch.scores = missing_end_penalty(batch.raw_scores, batch.ended, cfg.missing_end_penalty)
    timings["scoring"] = timings.get("scoring", 0.0) + time.perf_counter() - started
    return batch


# --- the loop ------------------------------------------------------------------------------------


@dataclass
class PPOState:
    iteration: int = 0  # rollout batches done
    episodes: int = 0
    kl: dict = field(default_factory=dict)  # the KL controller's state
    ema: dict | None = None  # the EMA's state
    collapsed: int = 0  # iterations in a row with identical scores
    history: list[dict] = field(default_factory=list)


def iteration_prompts(n: int, iteration: int, cfg: PPOConfig, rank: int, world_size: int) -> list[int]:
    """The prompt indices worker `rank` answers at `iteration`: epochs over the prompts, each freshly shuffled."""
    local = cfg.local_batch(world_size)
    start = iteration * cfg.batch_size + rank * local
    orders: dict[int, list[int]] = {}  # epoch -> that epoch's permutation of the prompts
    out = []
    for position in range(start, start + local):
        epoch, i = divmod(position, n)
        if epoch not in orders:
            g = torch.Generator().manual_seed(cfg.seed * 1_000_003 + epoch)
            orders[epoch] = torch.randperm(n, generator=g).tolist()
        out.append(orders[epoch][i])
    return out


def ptx_batch(tokens: torch.Tensor, cfg: PPOConfig, iteration: int, minibatch: int,
              rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Random windows of the pretraining token stream for PPO-ptx, fixed by (seed, iteration, minibatch, rank)."""
    if tokens.numel() <= cfg.ptx_seq_len + 1:
        raise InstructflowError(f"the pretraining tokens for PPO-ptx ({tokens.numel()}) are fewer than one window of "
                                f"{cfg.ptx_seq_len} + 1; lower ptx_seq_len")
    g = torch.Generator().manual_seed(((cfg.seed * 7919 + iteration) * 131 + minibatch) * 64 + rank)
    starts = torch.randint(0, tokens.numel() - cfg.ptx_seq_len - 1, (cfg.ptx_batch_size,), generator=g)
    windows = torch.stack([tokens[s:s + cfg.ptx_seq_len + 1] for s in starts.tolist()]).long()
    return windows[:, :-1], windows[:, 1:]


def _global_mean(value: float, world_size: int, device) -> float:
    if world_size == 1:
        return value
    t = torch.tensor([value], device=device, dtype=torch.float64)
    dist.all_reduce(t)
    return t.item() / world_size


def _gathered(values: torch.Tensor, world_size: int) -> torch.Tensor:
    if world_size == 1:
        return values
    parts = [torch.empty_like(values) for _ in range(world_size)]
    dist.all_gather(parts, values.contiguous())
    return torch.cat(parts)


def ppo(
    policy: torch.nn.Module,
    ref: GPT,
    value: torch.nn.Module,
    reward: RewardModel,
    prompts: Sequence[Sequence[int]],
    cfg: PPOConfig,
    *,
    pad: int,
    stop_tokens: Sequence[int],
    policy_optimizer: torch.optim.Optimizer,
    value_optimizer: torch.optim.Optimizer,
    ptx_tokens: torch.Tensor | None = None,
    log: Callable[[dict, int], None] = lambda metrics, step: None,
    state: PPOState | None = None,
    on_iteration_end: Callable[[PPOState, EMA | None], None] | None = None,
    autocast=None,
    rank: int = 0,
    world_size: int = 1,
) -> tuple[PPOState, EMA | None]:
    """Run PPO for cfg.iterations rollout batches (resuming at state.iteration); metrics are logged per iteration
    with the step = episodes done. `policy` and `value` may be DDP-wrapped; `ref` and `reward` are frozen.

    Returns the state and the EMA of the policy weights (None without ema_decay). Raises FloatingPointError on a
    non-finite loss, InstructflowError when the KL estimate is negative beyond noise or the scores collapse.
    """
    if not prompts:
        raise InstructflowError("no prompts for PPO rollouts")
    if cfg.ptx_coef > 0 and ptx_tokens is None:
        raise InstructflowError("PPO-ptx (ptx_coef > 0) needs pretraining tokens; pass the tokenizer stage's shards")
    autocast = autocast or nullcontext
    policy_core, value_core = getattr(policy, "module", policy), getattr(value, "module", value)
    if policy_core.config.vocab_size != reward.config.vocab_size:
        raise InstructflowError(f"the reward model's vocabulary ({reward.config.vocab_size}) differs from the "
                                f"policy's ({policy_core.config.vocab_size}): they must share one tokenizer")
    device = policy_core.wte.weight.device
    local = cfg.local_batch(world_size)
    mini = local // cfg.mini_batches
    state = state or PPOState()
    controller = kl_controller(cfg.beta, cfg.kl_target, cfg.kl_horizon)
    if state.kl:
        controller.load_state_dict(state.kl)
    ema = EMA(policy_core, cfg.ema_decay) if cfg.ema_decay else None
    if ema is not None and state.ema:
        ema.load_state_dict(state.ema)
    for frozen in (ref, reward):
        frozen.eval().requires_grad_(False)
    # Dropout off everywhere: PPO's ratio compares the same network before and after the update (TRL does the same)
    policy.eval()
    value.eval()

    while state.iteration < cfg.iterations:
        timings: dict[str, float] = {}
        started = time.perf_counter()
        chosen = iteration_prompts(len(prompts), state.iteration, cfg, rank, world_size)
        queries = [list(prompts[i]) for i in chosen]
        # 1. generate + 2. score (policy, reference, value, reward model)
        seed = (cfg.seed * 1_000_003 + state.iteration) * 1024 + rank
        batch = rollout(policy_core, ref, value_core, reward, queries, cfg, pad=pad, stop_tokens=stop_tokens,
                        seed=seed, autocast=autocast, timings=timings)
        for name in ("logprobs", "ref_logprobs", "values", "scores"):
            check_finite(f"rollout {name}", getattr(batch, name))
        # 3. KL-shaped rewards: -β·KL on every token, the score on the last one (InstructGPT eq. 2)
        beta = controller.value
        rewards, kl = shaped_rewards(batch.scores, batch.logprobs, batch.ref_logprobs, batch.mask, beta,
                                     cfg.kl_estimator)
        kl_per_sequence = (batch.logprobs - batch.ref_logprobs).mul(batch.mask).sum(1)  # k1 summed: the KL estimate
        check_kl(_gathered(kl_per_sequence, world_size))
        # 4. advantages: GAE, then whitened over the batch (lm-human-preference-details)
        advantages, returns = gae(rewards, batch.values, batch.mask, cfg.gamma, cfg.lam)
        advantages = whiten(advantages, batch.mask)
        # 5. PPO epochs over shuffled minibatches
        update_started = time.perf_counter()
        lrs = [lr_at(state.iteration, peak, warmup_steps=cfg.warmup_iterations, warmup_start=0.1, decay="constant")
               for peak in (cfg.learning_rate, cfg.value_learning_rate or cfg.learning_rate)]
        for optimizer, lr in zip((policy_optimizer, value_optimizer), lrs):
            for group in optimizer.param_groups:
                group["lr"] = lr
        stats: dict[str, list[float]] = {k: [] for k in ("policy_loss", "value_loss", "ptx_loss", "clipfrac",
                                                         "approxkl", "vf_clipfrac", "entropy", "ratio")}
        shuffle = torch.Generator().manual_seed(seed)
        for epoch in range(cfg.ppo_epochs):
            order = torch.randperm(local, generator=shuffle)
            for m in range(cfg.mini_batches):
                rows = order[m * mini:(m + 1) * mini].to(device)
                part = batch.select(rows)
                sync = getattr(policy, "no_sync", nullcontext) if cfg.ptx_coef > 0 else nullcontext
                with sync(), autocast():
                    logits = response_logits(policy, part, cfg.temperature)
                    new_logprobs = logprobs_from_logits(logits, part.idx[:, part.prompt_len:])
                    R = part.mask.size(1)  # the minibatch's longest response
                    pg_loss, pg_stats = policy_loss(new_logprobs, part.logprobs, advantages[rows, :R], part.mask,
                                                    cfg.clip_range)
                    new_values = response_values(value, part).float()
                    vf_loss, vf_stats = value_loss(new_values, part.values, returns[rows, :R], part.mask,
                                                   cfg.clip_range_value)
                    loss = pg_loss + cfg.value_coef * vf_loss
                check_finite("the PPO loss", loss)
                loss.backward()
                if cfg.ptx_coef > 0:  # PPO-ptx: the pretraining LM loss, its gradient added to the policy's
                    x, y = ptx_batch(ptx_tokens, cfg, state.iteration, epoch * cfg.mini_batches + m, rank)
                    with autocast():
                        _, lm_loss = policy(x.to(device), y.to(device))
                    check_finite("the PPO-ptx loss", lm_loss)
                    (cfg.ptx_coef * lm_loss).backward()
                    stats["ptx_loss"].append(lm_loss.item())
                for model, optimizer in ((policy, policy_optimizer), (value, value_optimizer)):
                    torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip or float("inf"))
                    optimizer.step()
                    optimizer.zero_grad(set_to_none=True)
                with torch.no_grad():
                    stats["entropy"].append(masked_mean(entropy_from_logits(logits), part.mask).item())
                stats["policy_loss"].append(pg_loss.item())
                stats["value_loss"].append(vf_loss.item())
                stats["clipfrac"].append(pg_stats["clipfrac"])
                stats["approxkl"].append(pg_stats["approxkl"])
                stats["ratio"].append(pg_stats["ratio"])
                stats["vf_clipfrac"].append(vf_stats["clipfrac"])
        timings["update"] = time.perf_counter() - update_started
        # 6. bookkeeping: KL controller (on the global mean KL), EMA, guards, metrics
        mean_kl = _global_mean(kl_per_sequence.mean().item(), world_size, device)
        controller.update(mean_kl, cfg.batch_size)
        if ema is not None:
            ema.update(policy_core)
        all_scores = _gathered(batch.raw_scores, world_size)  # the reward model's own verdicts
        state.collapsed = state.collapsed + 1 if all_scores.numel() > 1 and all_scores.std().item() < 1e-6 else 0
        if state.collapsed >= cfg.collapse_patience:
            raise InstructflowError(
                f"reward collapse: for {state.collapsed} rollout batches in a row every response got the same score "
                f"({all_scores.mean().item():.4f}); the policy has likely collapsed to one answer. Lower the learning "
                f"rate or raise beta, and check the reward model's held-out accuracy")
        state.iteration += 1
        state.episodes += cfg.batch_size
        state.kl = controller.state_dict()
        state.ema = ema.state_dict() if ema is not None else None
        elapsed = time.perf_counter() - started
        if state.iteration % cfg.log_every == 0 or state.iteration == cfg.iterations:
            mean = lambda xs: sum(xs) / len(xs) if xs else 0.0  # noqa: E731
            metrics = {
                "objective/kl": mean_kl,
                "objective/kl_coef": beta,
                "objective/scores": _global_mean(batch.raw_scores.mean().item(), world_size, device),
                "objective/rlhf_reward": _global_mean((batch.scores - beta * kl_per_sequence).mean().item(),
                                                      world_size, device),
                "objective/non_score_reward": -beta * mean_kl,
                "objective/entropy": mean(stats["entropy"]),
                "objective/ended": batch.ended.float().mean().item(),
                "policy/approxkl": mean(stats["approxkl"]),
                "policy/clipfrac": mean(stats["clipfrac"]),
                "policy/ratio": mean(stats["ratio"]),
                "loss/policy": mean(stats["policy_loss"]),
                "loss/value": mean(stats["value_loss"]),
                "val/vpred": masked_mean(batch.values, batch.mask).item(),
                "val/clipfrac": mean(stats["vf_clipfrac"]),
                "returns/mean": masked_mean(returns, batch.mask).item(),
                "response_length": batch.mask.sum(1).mean().item(),
                "lr": lrs[0],
                "episodes_per_s": cfg.batch_size / elapsed,
                **{f"time/{k}": v for k, v in timings.items()},
            }
            if stats["ptx_loss"]:
                metrics["loss/ptx"] = mean(stats["ptx_loss"])
            state.history.append({"step": state.episodes, **metrics})
            log(metrics, state.episodes)
        if on_iteration_end is not None:
            on_iteration_end(state, ema)
    return state, ema


@torch.no_grad()
def sequence_kl(policy: GPT, ref: GPT, queries: Sequence[Sequence[int]], responses: Sequence[Sequence[int]], *,
                pad: int, stop_tokens: Sequence[int], batch_size: int = 32) -> torch.Tensor:
    """KL estimate log π(y|x) − log π_ref(y|x) (summed k1) per given response, (N,): how far the policy moved."""
    out = []
    for i in range(0, len(queries), batch_size):
        batch = lay_out(queries[i:i + batch_size], responses[i:i + batch_size], pad, stop_tokens,
                        policy.wte.weight.device)
        tokens = batch.idx[:, batch.prompt_len:]
        logp = logprobs_from_logits(response_logits(policy, batch, 1.0), tokens)
        ref_logp = logprobs_from_logits(response_logits(ref, batch, 1.0), tokens)
        out.append(((logp - ref_logp) * batch.mask).sum(1).cpu())
    return torch.cat(out)


@torch.no_grad()
def response_nll(model: GPT, queries: Sequence[Sequence[int]], responses: Sequence[Sequence[int]], *, pad: int,
                 stop_tokens: Sequence[int], batch_size: int = 32) -> float:
    """Mean per-token negative log-likelihood of the responses (stop token included) under `model`: a readability
    proxy when `model` is the SFT policy (PPO answers that stack rewarded words read as unlikely text)."""
    total, count = 0.0, 0.0
    for i in range(0, len(queries), batch_size):
        batch = lay_out(queries[i:i + batch_size], responses[i:i + batch_size], pad, stop_tokens,
                        model.wte.weight.device)
        logp = logprobs_from_logits(response_logits(model, batch, 1.0), batch.idx[:, batch.prompt_len:])
        total -= float((logp * batch.mask).sum())
        count += float(batch.mask.sum())
    return total / max(count, 1.0)
