"""The PPO loop: scoring layout, zero KL at the start, learning from a reward model, exact resume, and its guards."""

from __future__ import annotations

import copy

import pytest
import torch

import model.rlhf as rlhf
from model.config import GPTConfig
from model.errors import InstructflowError
from model.gpt import GPT
from model.ppo import logprobs_from_logits
from model.reward import Ranking, RewardConfig, RewardModel, normalise, train_reward
from model.rlhf import PPOConfig, PPOState, lay_out, ppo, response_logits, rollout
from model.train import make_optimizer

CONFIG = GPTConfig(vocab_size=16, block_size=32, n_layer=2, n_head=2, n_embd=32, dropout=0.0)
STOP, PAD, GOOD = 1, 0, 5
PROMPTS = [[2, 3], [2, 4], [2, 3, 4], [3]]


pytestmark = pytest.mark.usefixtures("one_thread")


def gpt(seed: int = 0) -> GPT:
    torch.manual_seed(seed)
    return GPT(CONFIG)


@pytest.fixture(scope="module")
def good_token_rm() -> RewardModel:
    """A reward model trained to prefer responses with more GOOD tokens (held-out accuracy checked)."""
    g = torch.Generator().manual_seed(0)
    rankings = []
    for _ in range(128):
        seqs, counts = [], []
        for _ in range(4):
            body = torch.randint(2, 16, (6,), generator=g).tolist()
            body = [t if t != GOOD else 6 for t in body]
            good = int(torch.randint(0, 5, (1,), generator=g))
            body[:good] = [GOOD] * good
            seqs.append((2, 3, *body, STOP))
            counts.append(good)
        levels = sorted(set(counts), reverse=True)
        rankings.append(Ranking(tuple(seqs), tuple(levels.index(c) for c in counts)))
    torch.manual_seed(1)
    model = RewardModel.from_gpt(gpt(1))
    state = train_reward(model, rankings[:112], rankings[112:], RewardConfig(learning_rate=1e-3, batch_size=8, epochs=2,
                                                                             eval_every=28), pad=PAD)
    assert state.history[-1]["val_accuracy"] > 0.85
    normalise(model, [list(s) for r in rankings for s in r.sequences], pad=PAD)
    return model.eval()


def models(rm: RewardModel, seed: int = 0):
    policy = gpt(seed)
    value = copy.deepcopy(rm)
    value.fold_normalisation()
    return policy, copy.deepcopy(policy), value


def small_cfg(**overrides) -> PPOConfig:
    values = dict(total_episodes=64, batch_size=16, mini_batches=2, ppo_epochs=2, learning_rate=1e-3,
                  max_new_tokens=8, warmup_iterations=0)
    return PPOConfig(**{**values, **overrides})


def run(policy, ref, value, rm, cfg, **kwargs):
    return ppo(policy, ref, value, rm, PROMPTS, cfg, pad=PAD, stop_tokens=[STOP],
               policy_optimizer=make_optimizer(policy, cfg), value_optimizer=make_optimizer(value, cfg), **kwargs)


def test_scoring_a_padded_batch_gives_each_responses_own_log_probabilities():
    model = gpt().eval()
    queries, responses = [[2, 3, 4], [3]], [[7, 8, STOP], [9]]
    batch = lay_out(queries, responses, PAD, [STOP])
    assert batch.mask.tolist() == [[1, 1, 1], [1, 0, 0]] and batch.ended.tolist() == [True, False]
    together = logprobs_from_logits(response_logits(model, batch, 1.0), batch.idx[:, batch.prompt_len:])
    for b, (q, r) in enumerate(zip(queries, responses)):
        alone = lay_out([q], [r], PAD, [STOP])
        own = logprobs_from_logits(response_logits(model, alone, 1.0), alone.idx[:, alone.prompt_len:])
        torch.testing.assert_close(together[b, :len(r)], own[0], rtol=1e-5, atol=1e-5)


def test_a_minibatch_drops_the_columns_that_are_padding_in_all_its_rows_and_scores_the_same(good_token_rm):
    model = gpt().eval()
    queries, responses = [[2, 3, 4, 5], [3], [2, 4], [6]], [[7, 8, 9, STOP], [9], [7, STOP], [8, 9]]
    batch = lay_out(queries, responses, PAD, [STOP])
    batch.values = torch.arange(16.0).view(4, 4)
    full = logprobs_from_logits(response_logits(model, batch, 1.0), batch.idx[:, batch.prompt_len:])
    rows = torch.tensor([1, 3])  # prompts of 1 token, responses of 1 and 2: 3 of 4 prompt columns and 2 of 4 go
    part = batch.select(rows)
    assert part.idx.tolist() == [[3, 9, PAD], [6, 8, 9]] and part.prompt_len == 1 and part.mask.size(1) == 2
    assert part.values.tolist() == [[4.0, 5.0], [12.0, 13.0]]
    trimmed = logprobs_from_logits(response_logits(model, part, 1.0), part.idx[:, part.prompt_len:])
    torch.testing.assert_close(trimmed * part.mask, full[rows, :2] * part.mask, rtol=1e-5, atol=1e-5)
    values = rlhf.response_values(good_token_rm, part)
    torch.testing.assert_close(values * part.mask, rlhf.response_values(good_token_rm, batch)[rows, :2] * part.mask,
                               rtol=1e-5, atol=1e-5)


def test_the_first_rollout_has_zero_kl_and_the_penalty_lands_on_unfinished_responses(good_token_rm):
    policy, ref, value = models(good_token_rm)
    cfg = small_cfg(max_new_tokens=3, missing_end_penalty=2.0)
    batch = rollout(policy, ref, value, good_token_rm, PROMPTS * 4, cfg, pad=PAD, stop_tokens=[STOP], seed=0)
    torch.testing.assert_close(batch.logprobs, batch.ref_logprobs)  # the policy starts as its reference
    unfinished = ~batch.ended
    assert unfinished.any()
    torch.testing.assert_close(batch.scores[unfinished], batch.raw_scores[unfinished] - 2.0)
    torch.testing.assert_close(batch.scores[batch.ended], batch.raw_scores[batch.ended])


def test_ppo_raises_the_reward_and_moves_away_from_the_reference(good_token_rm):
    policy, ref, value = models(good_token_rm)
    cfg = small_cfg(total_episodes=320, batch_size=32, mini_batches=4, learning_rate=2e-3, beta=0.01)
    state, _ = run(policy, ref, value, good_token_rm, cfg)
    scores = [h["objective/scores"] for h in state.history]
    assert len(scores) == cfg.iterations == 10
    assert sum(scores[-3:]) / 3 > sum(scores[:3]) / 3 + 0.5, scores
    assert state.history[-1]["objective/kl"] > 0
    for name in ("ppo/objective/kl", "ppo/objective/scores", "ppo/policy/approxkl", "ppo/policy/clipfrac",
                 "ppo/val/vpred", "ppo/episodes_per_s", "ppo/time/generation", "ppo/time/scoring", "ppo/time/update"):
        assert name.removeprefix("ppo/") in state.history[-1]


def test_a_resumed_run_continues_exactly(good_token_rm):
    cfg = small_cfg(ema_decay=0.9, kl_target=1.0)
    policy, ref, value = models(good_token_rm)
    straight, straight_ema = run(policy, ref, value, good_token_rm, cfg)

    saved = {}

    def keep_after_two(state: PPOState, ema) -> None:
        if state.iteration == 2:
            saved.update(policy=copy.deepcopy(first_policy.state_dict()), value=copy.deepcopy(first_value.state_dict()),
                         p_opt=copy.deepcopy(p_opt.state_dict()), v_opt=copy.deepcopy(v_opt.state_dict()),
                         state=copy.deepcopy(state))
            raise KeyboardInterrupt  # the run is killed after its checkpoint

    first_policy, _, first_value = models(good_token_rm)
    p_opt, v_opt = make_optimizer(first_policy, cfg), make_optimizer(first_value, cfg)
    with pytest.raises(KeyboardInterrupt):
        ppo(first_policy, ref, first_value, good_token_rm, PROMPTS, cfg, pad=PAD, stop_tokens=[STOP],
            policy_optimizer=p_opt, value_optimizer=v_opt, on_iteration_end=keep_after_two)

    resumed_policy, _, resumed_value = models(good_token_rm, seed=3)  # other weights: all must come from the save
    resumed_policy.load_state_dict(saved["policy"])
    resumed_value.load_state_dict(saved["value"])
    p_opt, v_opt = make_optimizer(resumed_policy, cfg), make_optimizer(resumed_value, cfg)
    p_opt.load_state_dict(saved["p_opt"])
    v_opt.load_state_dict(saved["v_opt"])
    state, ema = ppo(resumed_policy, ref, resumed_value, good_token_rm, PROMPTS, cfg, pad=PAD, stop_tokens=[STOP],
                     policy_optimizer=p_opt, value_optimizer=v_opt, state=saved["state"])
    assert state.iteration == straight.iteration and state.kl == straight.kl
    for name, value in policy.state_dict().items():
        torch.testing.assert_close(resumed_policy.state_dict()[name], value, rtol=0, atol=0)
    for name, value in straight_ema.state_dict()["shadow"].items():
        torch.testing.assert_close(ema.state_dict()["shadow"][name], value, rtol=0, atol=0)


def test_ppo_ptx_adds_the_pretraining_loss_and_needs_tokens(good_token_rm):
    policy, ref, value = models(good_token_rm)
    cfg = small_cfg(total_episodes=16, ptx_coef=1.0, ptx_batch_size=2, ptx_seq_len=8)
    with pytest.raises(InstructflowError, match="pretraining tokens"):
        run(policy, ref, value, good_token_rm, cfg)
    tokens = torch.randint(2, 16, (500,), generator=torch.Generator().manual_seed(0))
    state, _ = run(policy, ref, value, good_token_rm, cfg, ptx_tokens=tokens)
    assert state.history[-1]["loss/ptx"] > 0


def test_sampling_from_another_distribution_than_the_scored_one_is_refused(good_token_rm, monkeypatch):
    policy, ref, value = models(good_token_rm)
    with torch.no_grad():  # a peaked policy against a uniform reference...
        policy.ln_f.weight.mul_(20)
        ref.ln_f.weight.zero_()
        ref.ln_f.bias.zero_()
    real_generate = rlhf.generate

    def uniform_sampling(model, prompts, max_new_tokens, **kwargs):  # ...sampled as if at a very high temperature
        return real_generate(model, prompts, max_new_tokens, **{**kwargs, "temperature": 1000.0})

    monkeypatch.setattr(rlhf, "generate", uniform_sampling)
    with pytest.raises(InstructflowError, match="KL"):
        run(policy, ref, value, good_token_rm, small_cfg())


def test_identical_scores_for_every_response_stop_the_run(good_token_rm):
    policy, ref, value = models(good_token_rm)
    flat = copy.deepcopy(good_token_rm)
    with torch.no_grad():
        flat.head.weight.zero_()
    with pytest.raises(InstructflowError, match="reward collapse"):
        run(policy, ref, value, flat, small_cfg(collapse_patience=2))


def test_non_finite_weights_fail_with_a_clear_message(good_token_rm):
    policy, ref, value = models(good_token_rm)
    with torch.no_grad():
        value.head.weight.fill_(float("nan"))
    with pytest.raises(FloatingPointError, match="nan"):
        run(policy, ref, value, good_token_rm, small_cfg())


def test_bad_settings_are_refused_before_any_work(good_token_rm):
    with pytest.raises(InstructflowError, match="multiple of"):
        PPOConfig(batch_size=10, mini_batches=4)
    with pytest.raises(InstructflowError, match="temperature"):
        PPOConfig(temperature=0)
    with pytest.raises(InstructflowError, match="split into"):
        small_cfg().local_batch(3)
    other_vocab = RewardModel(GPTConfig(vocab_size=17, block_size=32, n_layer=1, n_head=1, n_embd=8))
    policy, ref, value = models(good_token_rm)
    with pytest.raises(InstructflowError, match="vocabulary"):
        run(policy, ref, value, other_vocab, small_cfg())
