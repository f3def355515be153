"""InstructGPT step 3 (RLHF) math: KL-shaped rewards, GAE, the PPO clipped losses, KL controllers, EMA and checks.

Every function is pure PyTorch, tensors in and tensors out; the rollout and the optimiser loop live elsewhere.

Conventions: a batch tensor is (B, T) over RESPONSE tokens only (the prompt is not part of the episode), and
`mask` is (B, T), 1 on real response tokens and 0 on the right padding after a response ended, so each row's
response is a contiguous prefix of 1s. Values at padding positions may be garbage; every function here ignores them.

References:
  InstructGPT  Ouyang et al. 2022, "Training language models to follow instructions with human feedback", §3.5 eq. 2
  Ziegler      Ziegler et al. 2019, "Fine-Tuning Language Models from Human Preferences", §2.2 (KL penalty, beta)
  PPO          Schulman et al. 2017, "Proximal Policy Optimization Algorithms", eq. 7 (clipped surrogate)
  GAE          Schulman et al. 2016, "High-Dimensional Continuous Control Using Generalized Advantage Estimation"
  k1/k2/k3     J. Schulman's blog, "Approximating KL divergence" (2020)
  N-details    Huang et al. 2022, "The N Implementation Details of RLHF with PPO" (lm-human-preference-details), and TRL
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor

from model.errors import InstructflowError

KL_KINDS = ("k1", "k2", "k3")


# --- masked statistics ---------------------------------------------------------------------------


def _where_mask(x: Tensor, mask: Tensor) -> Tensor:
    """x on real tokens, 0 on padding; `where` rather than `x * mask` so a nan/inf in the padding cannot leak in."""
    return torch.where(mask.bool(), x, torch.zeros((), dtype=x.dtype, device=x.device))


def masked_mean(x: Tensor, mask: Tensor, dim: int | None = None) -> Tensor:
    """Mean of x over the positions where mask is 1 (all of them, or along `dim`); 0 where nothing is masked in."""
    mask = mask.to(x.dtype)
    total = _where_mask(x, mask).sum() if dim is None else _where_mask(x, mask).sum(dim)
    count = mask.sum() if dim is None else mask.sum(dim)
    return total / count.clamp(min=1.0)  # the mask is 0/1, so a count is >= 1 unless empty: empty -> 0, not nan


def masked_var(x: Tensor, mask: Tensor, unbiased: bool = True) -> Tensor:
    """Variance of x over all masked-in elements (a scalar); `unbiased` applies Bessel's n / (n - 1)."""
    mean = masked_mean(x, mask)
    var = masked_mean((x - mean) ** 2, mask)
    if unbiased:
        n = mask.to(x.dtype).sum()
        var = var * n / (n - 1).clamp(min=1.0)  # n = 1 has no spread to correct: var stays 0 instead of inf
    return var


def whiten(x: Tensor, mask: Tensor, shift_mean: bool = True, eps: float = 1e-8) -> Tensor:
    """(x - mean) / sqrt(var + eps) over the masked elements; padding returned as 0.

    shift_mean=False adds the mean back: rewards keep their sign and level and only their scale is normalised
    (N-details / TRL whiten; advantages are whitened with the shift, rewards without).
    """
    mean, var = masked_mean(x, mask), masked_var(x, mask)
    whitened = (x - mean) * torch.rsqrt(var + eps)
    if not shift_mean:
        whitened = whitened + mean
    return _where_mask(whitened, mask)


# --- log-probabilities, entropy and KL -----------------------------------------------------------


def logprobs_from_logits(logits: Tensor, tokens: Tensor) -> Tensor:
    """log p(token) under softmax(logits): (B, T, V), (B, T) -> (B, T), in float32.

    float32 because PPO's ratio exp(logp - old_logp) amplifies bf16's ~3-digit rounding of log-probs into a ratio
    off by percents, which alone would trigger the 0.2 clip (N-details: compute log-probs in fp32).
    """
    logits = logits.float()  # (B, T, V)
    picked = logits.gather(-1, tokens.long().unsqueeze(-1)).squeeze(-1)  # (B, T)
    return picked - torch.logsumexp(logits, dim=-1)  # log-softmax of the picked token only, no (B, T, V) log-probs


def entropy_from_logits(logits: Tensor) -> Tensor:
    """Entropy of softmax(logits) per position: (B, T, V) -> (B, T), in float32."""
    logp = torch.log_softmax(logits.float(), dim=-1)  # (B, T, V)
    p = logp.exp()
    # A -inf logit (a token filtered out, e.g. by top-k) has p = 0 and logp = -inf: its term is 0, not 0 * -inf = nan
    # (masked_fill before the product, so the backward pass sees no nan either).
    return -(p * logp.masked_fill(p == 0, 0.0)).sum(-1)


def kl_per_token(logprobs: Tensor, ref_logprobs: Tensor, kind: str = "k1") -> Tensor:
    """A per-token estimate of KL(policy || reference) from the sampled tokens' log-probs: (B, T) -> (B, T).

    With log r = ref_logprobs - logprobs on tokens sampled from the policy (Schulman's blog):
      k1 = -log r            unbiased, high variance, can be negative per token (what InstructGPT eq. 2 uses)
      k2 = 0.5 * (log r)^2   biased, low variance, >= 0
      k3 = (r - 1) - log r   unbiased, low variance, >= 0 (r - 1 is a control variate with mean 0)
    """
    if kind not in KL_KINDS:
        raise InstructflowError(f"unknown KL estimator {kind!r}; choose one of {', '.join(KL_KINDS)}")
    log_ratio = ref_logprobs - logprobs  # (B, T), log r
    if kind == "k1":
        return -log_ratio
    if kind == "k2":
        return 0.5 * log_ratio**2
    return torch.expm1(log_ratio) - log_ratio  # expm1: exact r - 1 near r = 1, where k3 is a difference of tiny terms


def shaped_rewards(scores: Tensor, logprobs: Tensor, ref_logprobs: Tensor, mask: Tensor, beta: float,
                   kind: str = "k1") -> tuple[Tensor, Tensor]:
    """Per-token rewards (B, T) and the per-token KL (B, T), both 0 on padding.

    InstructGPT eq. 2 (after Ziegler §2.2): every response token is penalised by -beta * KL_t for drifting from the
    SFT model, and the reward model's score (B,) is paid once, on the last real token (index mask.sum(1) - 1),
    because it judges the whole response. A row with an empty mask gets no score.
    """
    kl = _where_mask(kl_per_token(logprobs, ref_logprobs, kind), mask)  # (B, T)
    rewards = -beta * kl  # (B, T)
    last = mask.to(torch.long).sum(1) - 1  # (B,), -1 for an empty row
    positions = torch.arange(mask.shape[1], device=mask.device)  # (T,)
    at_last = positions.unsqueeze(0) == last.unsqueeze(1)  # (B, T); an empty row's -1 matches no position
    rewards = rewards + at_last.to(rewards.dtype) * scores.to(rewards.dtype).unsqueeze(1)
    return rewards, kl


# --- advantages ----------------------------------------------------------------------------------


def gae_reference(rewards: Tensor, values: Tensor, mask: Tensor, gamma: float = 1.0,
                  lam: float = 0.95) -> tuple[Tensor, Tensor]:
    """GAE (Schulman 2016 eq. 16) as a plain double loop: the readable reference `gae` is tested against.

    delta_t = r_t + gamma * V_{t+1} - V_t, A_t = delta_t + gamma * lam * A_{t+1}, with V and A after the last real
    token 0 (the episode ends there). Returns (advantages, returns = advantages + values), both 0 on padding.
    """
    advantages = torch.zeros_like(values)
    for b in range(rewards.shape[0]):
        n = int(mask[b].sum().item())  # the response is the first n tokens
        next_value, next_advantage = 0.0, 0.0
        for t in reversed(range(n)):
            delta = rewards[b, t] + gamma * next_value - values[b, t]
            next_advantage = delta + gamma * lam * next_advantage
            advantages[b, t] = next_advantage
            next_value = values[b, t]
    returns = _where_mask(advantages + values, mask)
    return advantages, returns


def gae(rewards: Tensor, values: Tensor, mask: Tensor, gamma: float = 1.0, lam: float = 0.95) -> tuple[Tensor, Tensor]:
    """GAE vectorised over the batch: one reverse loop over T; equals `gae_reference`.

    A loop over T rather than a (T, T) matrix of (gamma * lam)^(s - t): T small (B,) steps are negligible next to
    the policy's forward passes, cost O(B T) instead of O(B T^2), and add in the same order as the reference (the
    matrix product sums in another order and underflows powers far from the diagonal).
    """
    m = mask.to(values.dtype)  # (B, T)
    values = _where_mask(values, mask)  # (B, T); 0 on padding, so V after the last real token is 0 (episode ends)
    rewards = _where_mask(rewards, mask)
    next_values = torch.cat([values[:, 1:], torch.zeros_like(values[:, :1])], dim=1)  # (B, T), V_{t+1}
    deltas = rewards + gamma * next_values - values  # (B, T)
    advantage = torch.zeros_like(values[:, 0])  # (B,), A_{t+1}; 0 after the last step
    reversed_advantages = []
    for t in reversed(range(values.shape[1])):
        # Multiplying by m_t resets A to 0 on padding, so a response's last token starts from A_{t+1} = 0.
        advantage = (deltas[:, t] + gamma * lam * advantage) * m[:, t]  # (B,)
        reversed_advantages.append(advantage)
    advantages = torch.stack(reversed_advantages[::-1], dim=1)  # (B, T)
    return advantages, _where_mask(advantages + values, mask)


# --- PPO losses ----------------------------------------------------------------------------------


def policy_loss(logprobs: Tensor, old_logprobs: Tensor, advantages: Tensor, mask: Tensor,
                clip_range: float = 0.2) -> tuple[Tensor, dict[str, float]]:
    """PPO's clipped surrogate (Schulman 2017 eq. 7), negated to be minimised, averaged over response tokens.

    loss = masked_mean(max(-A * ratio, -A * clip(ratio, 1 - eps, 1 + eps))), ratio = pi / pi_old per token.
    Stats: clipfrac (share of tokens where the clipped term was taken), approxkl (0.5 * mean (log ratio)^2, as in
    N-details / TRL), ratio (mean ratio).
    """
    # Constants of the rollout, zeroed on padding: `where` in masked_mean hides a nan there from the loss but not
    # from its gradient (0 * nan = nan in the backward pass of the discarded branch).
    advantages, old_logprobs = _where_mask(advantages.detach(), mask), _where_mask(old_logprobs.detach(), mask)
    log_ratio = logprobs - old_logprobs  # (B, T)
    ratio = log_ratio.exp()  # (B, T)
    unclipped = -advantages * ratio  # (B, T)
    clipped = -advantages * ratio.clamp(1.0 - clip_range, 1.0 + clip_range)  # (B, T)
    loss = masked_mean(torch.maximum(unclipped, clipped), mask)  # max of negatives = the pessimistic min of eq. 7
    with torch.no_grad():
        stats = {
            "clipfrac": masked_mean((clipped > unclipped).to(ratio.dtype), mask).item(),
            "approxkl": (0.5 * masked_mean(log_ratio**2, mask)).item(),
            "ratio": masked_mean(ratio, mask).item(),
        }
    return loss, stats


def value_loss(values: Tensor, old_values: Tensor, returns: Tensor, mask: Tensor,
               clip_range_value: float = 0.2) -> tuple[Tensor, dict[str, float]]:
    """Clipped value loss (PPO2 / N-details): 0.5 * masked_mean(max((v - R)^2, (v_clipped - R)^2)).

    v_clipped = old + clip(v - old, -c, c) keeps the value head near its rollout-time predictions, as the ratio clip
    does for the policy. Stats: clipfrac, vpred (mean value), error (mean unclipped squared error).
    """
    old_values, returns = _where_mask(old_values.detach(), mask), _where_mask(returns.detach(), mask)  # as above
    v_clipped = old_values + (values - old_values).clamp(-clip_range_value, clip_range_value)  # (B, T)
    unclipped = (values - returns) ** 2  # (B, T)
    clipped = (v_clipped - returns) ** 2  # (B, T)
    loss = 0.5 * masked_mean(torch.maximum(unclipped, clipped), mask)
    with torch.no_grad():
        stats = {
            "clipfrac": masked_mean((clipped > unclipped).to(values.dtype), mask).item(),
            "vpred": masked_mean(values, mask).item(),
            "error": masked_mean(unclipped, mask).item(),
        }
    return loss, stats


# --- KL coefficient ------------------------------------------------------------------------------


class FixedKLController:
    """A constant KL coefficient beta (InstructGPT §3.5 uses a fixed beta)."""

    def __init__(self, kl_coef: float):
        self.value = float(kl_coef)

    def update(self, current_kl: float, n_steps: int) -> None:
        pass

    def state_dict(self) -> dict[str, Any]:
        return {"value": self.value}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.value = float(state["value"])


class AdaptiveKLController:
    """Ziegler et al. 2019 §2.2: beta moves so the KL stays near `target`.

    e = clip(KL / target - 1, -0.2, 0.2); beta <- beta * (1 + e * n_steps / horizon). The clip bounds each step's
    change whatever one noisy KL estimate says.
    """

    def __init__(self, init_kl_coef: float, target: float, horizon: int):
        self.value, self.target, self.horizon = float(init_kl_coef), float(target), int(horizon)

    def update(self, current_kl: float, n_steps: int) -> None:
        check_finite("the KL between policy and reference", current_kl)  # a nan here would make beta nan for good
        error = min(max(current_kl / self.target - 1.0, -0.2), 0.2)
        self.value *= 1.0 + error * n_steps / self.horizon

    def state_dict(self) -> dict[str, Any]:
        return {"value": self.value, "target": self.target, "horizon": self.horizon}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.value, self.target, self.horizon = float(state["value"]), float(state["target"]), int(state["horizon"])


def kl_controller(beta: float, target: float | None = None,
                  horizon: int = 10000) -> FixedKLController | AdaptiveKLController:
    """A fixed beta when `target` is None, else one adapted towards `target` nats of KL per sequence."""
    if not beta > 0:
        raise InstructflowError(f"the KL coefficient beta must be > 0, got {beta}; InstructGPT used 0.02")
    if target is None:
        return FixedKLController(beta)
    if not target > 0:
        raise InstructflowError(f"the KL target must be > 0 nats, got {target}; Ziegler et al. used 6 (or no target)")
    if horizon <= 0:
        raise InstructflowError(f"the KL horizon must be a positive number of steps, got {horizon}; try 10000")
    return AdaptiveKLController(beta, target, horizon)


# --- scores, EMA and checks ----------------------------------------------------------------------


def missing_end_penalty(scores: Tensor, ended: Tensor, penalty: float) -> Tensor:
    """Scores (B,) less `penalty` for responses that never produced their stop token (TRL's missing_eos_penalty).

    A truncated response is otherwise scored as if it were whole, and the policy learns to ramble to the length limit.
    """
    if penalty < 0:
        raise InstructflowError(f"the missing-end penalty must be >= 0 (it is subtracted), got {penalty}")
    return torch.where(ended.bool(), scores, scores - penalty)


class EMA:
    """Exponential moving average of a module's float parameters: shadow <- decay * shadow + (1 - decay) * param.

    The shadow is kept in float32: with decay near 1 each step moves it by ~(1 - decay) of the gap, which bf16's
    8-bit mantissa would round away.
    """

    def __init__(self, module: torch.nn.Module, decay: float = 0.992):
        if not 0.0 < decay < 1.0:
            raise InstructflowError(f"the EMA decay must be in (0, 1), got {decay}; e.g. 0.992")
        self.decay = float(decay)
        self.shadow = {name: p.detach().float().clone() for name, p in _float_parameters(module)}

    @torch.no_grad()
    def update(self, module: torch.nn.Module) -> None:
        for name, p in _float_parameters(module):
            self._shadow(name).lerp_(p.detach().float(), 1.0 - self.decay)  # s + (1 - d)(p - s) = d s + (1 - d) p

    @torch.no_grad()
    def copy_to(self, module: torch.nn.Module) -> None:
        for name, p in _float_parameters(module):
            p.copy_(self._shadow(name))  # copy_ casts back to the parameter's dtype and device

    def state_dict(self) -> dict[str, Any]:
        return {"decay": self.decay, "shadow": {name: s.clone() for name, s in self.shadow.items()}}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.decay = float(state["decay"])
        self.shadow = {name: s.float().clone() for name, s in state["shadow"].items()}

    def _shadow(self, name: str) -> Tensor:
        if name not in self.shadow:
            raise InstructflowError(f"the EMA has no parameter {name!r}: it was made for another model; make a new EMA")
        return self.shadow[name]


def _float_parameters(module: torch.nn.Module) -> list[tuple[str, torch.nn.Parameter]]:
    return [(name, p) for name, p in module.named_parameters() if p.is_floating_point()]


def check_finite(name: str, value: Tensor | float) -> None:
    """Raise FloatingPointError if `value` holds a nan or inf: PPO diverged, and every later step would be garbage."""
    finite = bool(torch.isfinite(value).all()) if isinstance(value, Tensor) else math.isfinite(value)
    if not finite:
        raise FloatingPointError(
            f"{name} became nan/inf during PPO training; lower the learning rate (or raise the KL coefficient, "
            f"narrow the clip ranges), and check the reward model's scores are finite"
        )


def check_kl(kl_per_sequence: Tensor, tolerance: float = 3.0) -> None:
    """Refuse a batch whose KL(policy || reference) estimate is clearly negative.

    The per-sequence sum of k1 is >= 0 in expectation when responses are sampled from the very distribution the
    log-probs score (KL >= 0). A mean below -(tolerance * standard error + 1e-3) is not noise: the rollout was
    sampled from a different distribution (temperature, top-k/top-p, or another model), and the KL penalty and the
    PPO ratio are then both wrong (N-details: "sampling with temperature" pitfall).
    """
    kl = kl_per_sequence.detach().float().flatten()  # (B,)
    n = kl.numel()
    if n == 0:
        return
    mean = kl.mean().item()
    stderr = (kl.std() / math.sqrt(n)).item() if n > 1 else 0.0  # one sequence has no spread: only the 1e-3 margin
    if mean < -(tolerance * stderr + 1e-3):
        raise InstructflowError(
            f"the KL between policy and reference is negative (mean {mean:.4f} nats per sequence over {n} sequences, "
            f"standard error {stderr:.4f}), which cannot happen when responses are sampled from the distribution "
            f"that scores their log-probs: the rollout's sampling settings (temperature/top-k/top-p) or model differ "
            f"from those used to score them. Sample with temperature 1 and no top-k/top-p, or score the log-probs "
            f"with the same temperature and filtering, from the same model"
        )
