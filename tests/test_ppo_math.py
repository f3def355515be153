"""PPO math for RLHF: masked statistics, KL estimators, shaped rewards, GAE, clipped losses, KL controllers, checks."""

from __future__ import annotations

import math

import pytest
import torch

from model.errors import InstructflowError
from model.ppo import (EMA, AdaptiveKLController, FixedKLController, check_finite, check_kl, entropy_from_logits, gae,
                       gae_reference, kl_controller, kl_per_token, logprobs_from_logits, masked_mean, masked_var,
                       missing_end_penalty, policy_loss, shaped_rewards, value_loss, whiten)


pytestmark = pytest.mark.usefixtures("one_thread")


def right_padded_mask(lengths: list[int], T: int) -> torch.Tensor:
    return (torch.arange(T).unsqueeze(0) < torch.tensor(lengths).unsqueeze(1)).float()  # (B, T)


def with_nan_padding(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """x with nan on padding: whatever a function does with padding must not reach real positions."""
    return torch.where(mask.bool(), x, torch.full_like(x, float("nan")))


# --- masked statistics ---------------------------------------------------------------------------


def test_masked_mean_and_var_match_the_selected_elements():
    g = torch.Generator().manual_seed(0)
    mask = right_padded_mask([5, 3, 1, 4], 5)
    x = with_nan_padding(torch.randn(4, 5, generator=g), mask)
    selected = x[mask.bool()]
    assert masked_mean(x, mask).item() == pytest.approx(selected.mean().item(), abs=1e-6)
    assert masked_var(x, mask).item() == pytest.approx(selected.var(unbiased=True).item(), abs=1e-6)
    assert masked_var(x, mask, unbiased=False).item() == pytest.approx(selected.var(unbiased=False).item(), abs=1e-6)
    rows = masked_mean(x, mask, dim=1)  # (B,)
    for b, n in enumerate([5, 3, 1, 4]):
        assert rows[b].item() == pytest.approx(x[b, :n].mean().item(), abs=1e-6)


def test_masked_mean_of_an_empty_mask_is_zero_not_nan():
    x = torch.randn(2, 3)
    mask = torch.zeros(2, 3)
    assert masked_mean(x, mask).item() == 0.0
    assert torch.equal(masked_mean(x, mask, dim=1), torch.zeros(2))
    assert torch.isfinite(masked_var(x, mask)).all()


def test_whiten_gives_zero_mean_unit_std_and_leaves_padding_zero():
    g = torch.Generator().manual_seed(1)
    mask = right_padded_mask([6, 2, 4], 6)
    x = with_nan_padding(3.0 + 5.0 * torch.randn(3, 6, generator=g), mask)
    w = whiten(x, mask)
    assert masked_mean(w, mask).item() == pytest.approx(0.0, abs=1e-5)
    assert masked_var(w, mask).item() == pytest.approx(1.0, abs=1e-4)
    assert torch.equal(w[~mask.bool()], torch.zeros(int((1 - mask).sum().item())))


def test_whiten_without_shift_keeps_the_mean_and_rescales():
    g = torch.Generator().manual_seed(2)
    mask = right_padded_mask([6, 5, 3], 6)
    x = with_nan_padding(3.0 + 5.0 * torch.randn(3, 6, generator=g), mask)
    w = whiten(x, mask, shift_mean=False)
    assert masked_mean(w, mask).item() == pytest.approx(masked_mean(x, mask).item(), abs=1e-5)
    assert masked_var(w, mask).item() == pytest.approx(1.0, abs=1e-4)
    assert torch.equal(w[~mask.bool()], torch.zeros(int((1 - mask).sum().item())))


# --- log-probabilities, entropy, KL --------------------------------------------------------------


def test_logprobs_from_logits_gathers_the_log_softmax_in_float32():
    g = torch.Generator().manual_seed(3)
    logits = torch.randn(2, 4, 7, generator=g)
    tokens = torch.randint(0, 7, (2, 4), generator=g)
    expected = torch.log_softmax(logits, -1).gather(-1, tokens.unsqueeze(-1)).squeeze(-1)
    torch.testing.assert_close(logprobs_from_logits(logits, tokens), expected)
    assert logprobs_from_logits(logits.bfloat16(), tokens).dtype == torch.float32


def test_entropy_from_logits_matches_the_definition_and_survives_filtered_tokens():
    g = torch.Generator().manual_seed(4)
    logits = torch.randn(2, 3, 6, generator=g)
    p = torch.softmax(logits, -1)
    torch.testing.assert_close(entropy_from_logits(logits), -(p * p.log()).sum(-1))
    uniform = torch.zeros(1, 1, 8)
    assert entropy_from_logits(uniform).item() == pytest.approx(math.log(8), abs=1e-6)
    filtered = logits.clone()
    filtered[..., :3] = float("-inf")  # top-k filtering leaves -inf logits
    filtered.requires_grad_(True)
    h = entropy_from_logits(filtered)
    q = torch.softmax(logits[..., 3:], -1)
    torch.testing.assert_close(h.detach(), -(q * q.log()).sum(-1))
    h.sum().backward()
    assert torch.isfinite(filtered.grad).all()


def test_kl_estimators_k1_and_k3_approximate_the_analytic_kl():
    g = torch.Generator().manual_seed(5)
    log_p = torch.log_softmax(torch.randn(10, generator=g), -1)  # policy
    log_q = torch.log_softmax(torch.randn(10, generator=g), -1)  # reference
    analytic = (log_p.exp() * (log_p - log_q)).sum().item()
    tokens = torch.multinomial(log_p.exp(), 200_000, replacement=True, generator=g)  # sampled from the policy
    logprobs, ref_logprobs = log_p[tokens], log_q[tokens]
    assert analytic > 0.1  # a KL large enough that a wrong estimator shows
    for kind in ("k1", "k3"):
        estimate = kl_per_token(logprobs, ref_logprobs, kind).mean().item()
        assert estimate == pytest.approx(analytic, abs=0.02), kind
    assert (kl_per_token(logprobs, ref_logprobs, "k1") < 0).any()  # k1 is unbiased only on average


def test_kl_estimators_k2_and_k3_are_nonnegative_and_k2_is_half_the_squared_log_ratio():
    g = torch.Generator().manual_seed(6)
    logprobs, ref_logprobs = -5 * torch.rand(4, 50, generator=g), -5 * torch.rand(4, 50, generator=g)
    assert (kl_per_token(logprobs, ref_logprobs, "k3") >= 0).all()
    k2 = kl_per_token(logprobs, ref_logprobs, "k2")
    assert (k2 >= 0).all()
    torch.testing.assert_close(k2, 0.5 * (logprobs - ref_logprobs) ** 2)
    torch.testing.assert_close(kl_per_token(logprobs, ref_logprobs), logprobs - ref_logprobs)
    with pytest.raises(InstructflowError, match="k1, k2, k3"):
        kl_per_token(logprobs, ref_logprobs, "k4")


def test_shaped_rewards_pay_the_score_on_the_last_real_token():
    g = torch.Generator().manual_seed(7)
    mask = right_padded_mask([5, 2, 0, 1], 5)
    logprobs = with_nan_padding(-torch.rand(4, 5, generator=g), mask)
    ref_logprobs = with_nan_padding(-torch.rand(4, 5, generator=g), mask)
    scores = torch.tensor([1.0, 2.0, 3.0, 4.0])
    beta = 0.1
    rewards, kl = shaped_rewards(scores, logprobs, ref_logprobs, mask, beta)
    k1 = torch.where(mask.bool(), logprobs - ref_logprobs, torch.zeros(()))
    torch.testing.assert_close(kl, k1)
    expected = -beta * k1
    expected[0, 4] += 1.0
    expected[1, 1] += 2.0
    expected[3, 0] += 4.0  # row 2 is empty: no score anywhere
    torch.testing.assert_close(rewards, expected)
    assert torch.equal(rewards[~mask.bool()], torch.zeros(int((1 - mask).sum().item())))
    _, kl3 = shaped_rewards(scores, logprobs, ref_logprobs, mask, beta, kind="k3")
    assert (kl3 >= 0).all()


# --- GAE -----------------------------------------------------------------------------------------


@pytest.mark.parametrize("gamma,lam", [(1.0, 0.95), (0.99, 0.9), (1.0, 1.0), (0.9, 0.0)])
def test_gae_equals_the_reference_loop(gamma, lam):
    g = torch.Generator().manual_seed(8)
    B, T = 16, 12
    lengths = torch.randint(0, T + 1, (B,), generator=g).tolist()
    lengths[0], lengths[1] = T, 1  # a full row and a one-token row, whatever the draw
    mask = right_padded_mask(lengths, T)
    rewards = with_nan_padding(torch.randn(B, T, generator=g), mask)
    values = with_nan_padding(torch.randn(B, T, generator=g), mask)
    advantages, returns = gae(rewards, values, mask, gamma, lam)
    ref_advantages, ref_returns = gae_reference(rewards, values, mask, gamma, lam)
    torch.testing.assert_close(advantages, ref_advantages, atol=1e-5, rtol=0)
    torch.testing.assert_close(returns, ref_returns, atol=1e-5, rtol=0)
    padding = ~mask.bool()
    for tensor in (advantages, returns, ref_advantages, ref_returns):
        assert torch.equal(tensor[padding], torch.zeros(int(padding.sum().item())))


def test_gae_with_no_discount_and_zero_values_is_the_sum_of_future_rewards():
    g = torch.Generator().manual_seed(9)
    mask = right_padded_mask([6, 4, 1], 6)
    rewards = with_nan_padding(torch.randn(3, 6, generator=g), mask)
    values = torch.zeros(3, 6)
    future = torch.where(mask.bool(), rewards, torch.zeros(())).flip(1).cumsum(1).flip(1) * mask  # (B, T)
    for fn in (gae, gae_reference):
        advantages, returns = fn(rewards, values, mask, gamma=1.0, lam=1.0)
        torch.testing.assert_close(advantages, future)
        torch.testing.assert_close(returns, future)


def test_gae_one_step_is_the_td_error():
    # lam = 0: A_t = r_t + gamma V_{t+1} - V_t, and the value after the last real token is 0.
    rewards = torch.tensor([[1.0, 2.0, 5.0]])
    values = torch.tensor([[0.5, 1.5, 9.0]])
    mask = torch.tensor([[1.0, 1.0, 0.0]])
    advantages, _ = gae(rewards, values, mask, gamma=0.5, lam=0.0)
    torch.testing.assert_close(advantages, torch.tensor([[1.0 + 0.5 * 1.5 - 0.5, 2.0 - 1.5, 0.0]]))


# --- PPO losses ----------------------------------------------------------------------------------


def _policy_grad(ratio: float, advantage: float, clip_range: float = 0.2) -> float:
    logprobs = torch.tensor([[math.log(ratio)]], requires_grad=True)
    loss, _ = policy_loss(logprobs, torch.zeros(1, 1), torch.tensor([[advantage]]), torch.ones(1, 1), clip_range)
    loss.backward()
    return logprobs.grad.item()


def test_policy_loss_gradient_vanishes_only_past_the_clip_in_the_advantage_direction():
    assert _policy_grad(1.5, +1.0) == 0.0  # ratio > 1 + eps, A > 0: no further push up
    assert _policy_grad(0.5, -1.0) == 0.0  # ratio < 1 - eps, A < 0: no further push down
    assert _policy_grad(1.1, +1.0) == pytest.approx(-1.1)  # inside: d(-A r)/d log r = -A r
    assert _policy_grad(0.9, -2.0) == pytest.approx(2.0 * 0.9)
    assert _policy_grad(0.5, +1.0) == pytest.approx(-0.5)  # outside but pointing back in: still a gradient
    assert _policy_grad(1.5, -1.0) == pytest.approx(1.5)


def test_policy_loss_clipfrac_and_stats_on_a_hand_made_batch():
    ratios = torch.tensor([[1.5, 0.5, 1.1, 0.5, 1.2, 2.0]])  # the last one is padding
    advantages = torch.tensor([[1.0, -1.0, 1.0, 1.0, 1.0, 1.0]])
    mask = torch.tensor([[1.0, 1.0, 1.0, 1.0, 1.0, 0.0]])
    logprobs = ratios.log()
    loss, stats = policy_loss(logprobs, torch.zeros_like(logprobs), advantages, mask, clip_range=0.2)
    # clipped taken: 1.5 with A > 0 and 0.5 with A < 0; 1.2 sits on the bound (a tie, not clipped)
    assert stats["clipfrac"] == pytest.approx(2 / 5)
    terms = [-1.2, 0.8, -1.1, -0.5, -1.2]
    assert loss.item() == pytest.approx(sum(terms) / 5, abs=1e-6)
    assert stats["ratio"] == pytest.approx((1.5 + 0.5 + 1.1 + 0.5 + 1.2) / 5, abs=1e-6)
    log_r = logprobs[0, :5]
    assert stats["approxkl"] == pytest.approx(0.5 * (log_r**2).mean().item(), abs=1e-6)


def test_policy_loss_at_ratio_one_is_minus_the_mean_advantage():
    g = torch.Generator().manual_seed(10)
    mask = right_padded_mask([4, 2], 4)
    logprobs = -torch.rand(2, 4, generator=g)
    advantages = with_nan_padding(torch.randn(2, 4, generator=g), mask)
    loss, stats = policy_loss(logprobs, logprobs.clone(), advantages, mask)
    assert loss.item() == pytest.approx(-masked_mean(advantages, mask).item(), abs=1e-6)
    assert stats["clipfrac"] == 0.0 and stats["approxkl"] == 0.0 and stats["ratio"] == pytest.approx(1.0)
    logprobs.requires_grad_(True)
    loss, _ = policy_loss(logprobs, logprobs.detach().clone(), advantages, mask)
    loss.backward()  # nan advantages on padding reach neither the loss nor its gradient
    torch.testing.assert_close(logprobs.grad, -torch.where(mask.bool(), advantages, torch.zeros(())) / mask.sum())


def test_value_loss_on_a_hand_made_batch_with_clipping():
    values = torch.tensor([[1.0, 0.0, 0.5, 7.0]], requires_grad=True)  # the last one is padding
    old_values = torch.tensor([[0.0, 0.0, 0.0, 0.0]])
    returns = torch.tensor([[2.0, 0.5, 0.0, float("nan")]])
    mask = torch.tensor([[1.0, 1.0, 1.0, 0.0]])
    loss, stats = value_loss(values, old_values, returns, mask, clip_range_value=0.2)
    # token 0: clipped to 0.2, (0.2 - 2)^2 = 3.24 > (1 - 2)^2 = 1 -> clipped taken
    # token 1: no move, both 0.25 (a tie); token 2: clipped 0.2 -> 0.04 < 0.25 -> unclipped taken
    assert loss.item() == pytest.approx(0.5 * (3.24 + 0.25 + 0.25) / 3, abs=1e-6)
    assert stats["clipfrac"] == pytest.approx(1 / 3)
    assert stats["vpred"] == pytest.approx(0.5)
    assert stats["error"] == pytest.approx((1.0 + 0.25 + 0.25) / 3)
    loss.backward()
    # d/dv 0.5 (v - R)^2 / 3 where the unclipped term counts (a tie counts both, equal); 0 where clipped or padding
    torch.testing.assert_close(values.grad, torch.tensor([[0.0, -0.5 / 3, 0.5 / 3, 0.0]]))


# --- KL controllers ------------------------------------------------------------------------------


def test_adaptive_kl_controller_moves_beta_towards_the_target_within_the_clip():
    controller = AdaptiveKLController(0.1, target=6.0, horizon=10000)
    controller.update(7.0, n_steps=100)  # 1/6 above target
    assert controller.value == pytest.approx(0.1 * (1 + (1 / 6) * 100 / 10000))
    before = controller.value
    controller.update(600.0, n_steps=100)  # far above: the error is clipped at 0.2
    assert controller.value == pytest.approx(before * (1 + 0.2 * 100 / 10000))
    before = controller.value
    controller.update(0.0, n_steps=100)  # far below: clipped at -0.2
    assert controller.value == pytest.approx(before * (1 - 0.2 * 100 / 10000))
    before = controller.value
    controller.update(6.0, n_steps=100)
    assert controller.value == pytest.approx(before)
    with pytest.raises(FloatingPointError):
        controller.update(float("nan"), n_steps=1)


def test_kl_controllers_state_dict_round_trip():
    controller = AdaptiveKLController(0.05, target=3.0, horizon=500)
    controller.update(5.0, n_steps=64)
    restored = AdaptiveKLController(1.0, target=1.0, horizon=1)
    restored.load_state_dict(controller.state_dict())
    assert restored.value == controller.value
    controller.update(1.0, n_steps=64)
    restored.update(1.0, n_steps=64)
    assert restored.value == controller.value
    fixed = FixedKLController(0.02)
    fixed.update(100.0, n_steps=1000)
    assert fixed.value == 0.02
    other = FixedKLController(1.0)
    other.load_state_dict(fixed.state_dict())
    assert other.value == 0.02


def test_kl_controller_picks_fixed_or_adaptive_and_refuses_bad_settings():
    assert isinstance(kl_controller(0.02), FixedKLController)
    adaptive = kl_controller(0.02, target=6.0, horizon=100)
    assert isinstance(adaptive, AdaptiveKLController) and adaptive.horizon == 100
    for bad in (dict(beta=0.0), dict(beta=-1.0), dict(beta=0.1, target=0.0), dict(beta=0.1, target=6.0, horizon=0)):
        with pytest.raises(InstructflowError):
            kl_controller(**bad)


# --- scores, EMA, checks -------------------------------------------------------------------------


def test_missing_end_penalty_lowers_only_unended_responses():
    scores = torch.tensor([1.0, 2.0, 3.0])
    ended = torch.tensor([True, False, True])
    torch.testing.assert_close(missing_end_penalty(scores, ended, 1.5), torch.tensor([1.0, 0.5, 3.0]))
    torch.testing.assert_close(missing_end_penalty(scores, ended, 0.0), scores)
    with pytest.raises(InstructflowError, match=">= 0"):
        missing_end_penalty(scores, ended, -1.0)


def test_ema_update_copy_to_and_state_dict():
    torch.manual_seed(11)
    model = torch.nn.Linear(3, 2)
    start = {n: p.detach().clone() for n, p in model.named_parameters()}
    ema = EMA(model, decay=0.9)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)
    ema.update(model)
    target = torch.nn.Linear(3, 2)
    ema.copy_to(target)
    for name, p in target.named_parameters():
        torch.testing.assert_close(p.detach(), 0.9 * start[name] + 0.1 * (start[name] + 1.0))
    restored = EMA(torch.nn.Linear(3, 2), decay=0.5)
    restored.load_state_dict(ema.state_dict())
    assert restored.decay == 0.9
    copy = torch.nn.Linear(3, 2)
    restored.copy_to(copy)
    for (_, a), (_, b) in zip(copy.named_parameters(), target.named_parameters()):
        assert torch.equal(a, b)
    with pytest.raises(InstructflowError, match="another model"):
        ema.update(torch.nn.Sequential(torch.nn.Linear(3, 2)))  # parameter names "0.weight", "0.bias"
    for decay in (0.0, 1.0, 1.5, -0.1):
        with pytest.raises(InstructflowError, match=r"\(0, 1\)"):
            EMA(model, decay=decay)


def test_check_finite_raises_on_nan_and_inf():
    check_finite("loss", torch.tensor([1.0, 2.0]))
    check_finite("kl", 0.5)
    with pytest.raises(FloatingPointError, match="loss became nan/inf.*lower the learning rate"):
        check_finite("loss", torch.tensor([1.0, float("nan")]))
    with pytest.raises(FloatingPointError, match="kl became nan/inf"):
        check_finite("kl", float("inf"))


def test_check_kl_refuses_a_clearly_negative_batch_and_passes_noise():
    g = torch.Generator().manual_seed(12)
    n = 256
    noise = torch.randn(n, generator=g)
    noise = noise - noise.mean()
    stderr = noise.std().item() / math.sqrt(n)
    check_kl(torch.rand(n, generator=g) + 0.1)  # positive
    check_kl(noise - 1.0 * stderr)  # one standard error below zero: noise
    with pytest.raises(InstructflowError, match="temperature"):
        check_kl(noise - 5.0 * stderr)  # five standard errors below: not noise
    with pytest.raises(InstructflowError, match="temperature 1"):
        check_kl(torch.full((64,), -0.5))
    check_kl(torch.tensor([-0.0005]))  # one sequence: only the 1e-3 margin
    with pytest.raises(InstructflowError):
        check_kl(torch.tensor([-0.01]))
