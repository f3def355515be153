"""The reward model: the K-wise loss against its formula, one forward pass per response, learning a preference,
normalisation, reading the reward at the last real token, saving, and clear errors."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from model.checkpoint import save_checkpoint
from model.config import GPTConfig
from model.errors import InstructflowError
from model.gpt import GPT
from model.reward import (Ranking, RewardConfig, RewardModel, collate_rankings, kwise_loss, load_reward_model,
                          normalise, pairwise_accuracy, ranking_accuracy, ranking_pairs, rewards_by_length, right_pad, save_reward_model, score,
                          train_reward)

CONFIG = GPTConfig(vocab_size=32, block_size=32, n_layer=2, n_head=2, n_embd=32, dropout=0.0)
GOOD = 5  # the synthetic preference: more of this token is better


pytestmark = pytest.mark.usefixtures("one_thread")


def reward_model(seed: int = 0) -> RewardModel:
    torch.manual_seed(seed)
    return RewardModel.from_gpt(GPT(CONFIG))


def synthetic_rankings(n: int, k: int = 4, seed: int = 0) -> list[Ranking]:
    """Prompt [1, 2] + a random response; ranked by how many GOOD tokens it holds (equal counts tie)."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        seqs, counts = [], []
        for _ in range(k):
            body = torch.randint(6, 32, (int(torch.randint(3, 9, (1,), generator=g)),), generator=g).tolist()
            good = int(torch.randint(0, 4, (1,), generator=g))
            body[:good] = [GOOD] * good
            seqs.append((1, 2, *body))
            counts.append(good)
        levels = sorted(set(counts), reverse=True)
        out.append(Ranking(tuple(seqs), tuple(levels.index(c) for c in counts)))
    return out


def test_pairs_of_a_ranking_cover_every_ordered_pair_once_and_ties_only_on_request():
    assert ranking_pairs([1, 0, 2]) == [(1, 0, 1.0), (0, 2, 1.0), (1, 2, 1.0)]
    assert ranking_pairs([0, 0, 1]) == [(0, 2, 1.0), (1, 2, 1.0)]  # the tie gives no pair
    assert ranking_pairs([0, 0, 1], tie_target=0.5) == [(0, 1, 0.5), (0, 2, 1.0), (1, 2, 1.0)]
    assert len(ranking_pairs(list(range(9)))) == math.comb(9, 2)


def test_kwise_loss_is_the_mean_over_prompts_of_the_mean_over_their_pairs():
    rankings = [Ranking(((1,), (2,), (3,)), (0, 1, 2)), Ranking(((4,), (5,)), (1, 0))]
    batch = collate_rankings(rankings, pad=0, block_size=8)
    assert batch.idx.shape == (5, 1) and batch.pairs == 4  # 3 + 2 responses, C(3,2) + C(2,2) pairs
    rewards = torch.tensor([2.0, 0.5, -1.0, 0.3, 1.1])
    loss, stats = kwise_loss(rewards, batch)
    first = -(F.logsigmoid(torch.tensor(1.5)) + F.logsigmoid(torch.tensor(3.0)) + F.logsigmoid(torch.tensor(1.5))) / 3
    second = -F.logsigmoid(torch.tensor(1.1 - 0.3))
    torch.testing.assert_close(loss, (first + second) / 2)
    assert stats["accuracy"] == 1.0
    # a tie with target 0.5 adds -(log σ(d) + log σ(-d)) / 2 for its pair
    tied = collate_rankings([Ranking(((1,), (2,)), (0, 0))], pad=0, block_size=8, tie_target=0.5)
    loss, _ = kwise_loss(torch.tensor([0.7, -0.2]), tied)
    d = torch.tensor(0.9)
    torch.testing.assert_close(loss, -(F.logsigmoid(d) + F.logsigmoid(-d)) / 2)


def test_held_out_accuracy_and_loss_are_the_training_loss_on_each_rankings_rewards():
    rankings = [Ranking(((1,), (2,), (3,)), (0, 1, 2)), Ranking(((4,), (5,)), (1, 0)), Ranking(((6,), (7,)), (0, 0))]
    tied = torch.tensor([0.0, 0.0])
    held_out = ranking_accuracy([torch.tensor([2.0, 0.5, -1.0]), torch.tensor([0.3, 1.1]), tied], rankings)
    loss, _ = kwise_loss(torch.tensor([2.0, 0.5, -1.0, 0.3, 1.1]), collate_rankings(rankings[:2], pad=0, block_size=8))
    assert held_out["pairs"] == 4 and held_out["accuracy"] == 1.0  # the all-tied ranking gives no pair
    assert held_out["loss"] == pytest.approx(float(loss))
    wrong_way = ranking_accuracy([torch.tensor([0.0, 1.0, 2.0]), torch.tensor([0.3, 1.1]), tied], rankings)
    assert wrong_way["accuracy"] == 1 / 4
    with pytest.raises(InstructflowError, match="no held-out comparison"):
        ranking_accuracy([tied], rankings[2:])


def test_every_response_goes_through_the_model_once_per_step():
    model = reward_model()
    rankings = synthetic_rankings(6, k=5)
    seen = []
    handle = model.register_forward_hook(lambda m, args, out: seen.append(args[0].size(0)))
    cfg = RewardConfig(learning_rate=1e-3, batch_size=6, epochs=1, eval_every=100, log_every=100)
    train_reward(model, rankings, [], cfg, pad=0)
    handle.remove()
    # one step, one forward of 6 prompts x 5 responses (pairs fed one by one would forward 2 x 6 x C(5,2) = 120)
    assert seen == [30]


def test_rewards_in_groups_of_similar_length_equal_one_padded_pass_with_the_same_gradients():
    model = reward_model()
    sequences = [list(s) for r in synthetic_rankings(5, k=4) for s in r.sequences]  # 20 of 5 to 11 tokens
    idx, lengths = right_pad(sequences, pad=0)
    whole = model(idx, lengths)
    whole.sum().backward()
    expected = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    grouped = rewards_by_length(model, idx, lengths, group=6)
    torch.testing.assert_close(grouped, whole, rtol=1e-5, atol=1e-5)
    grouped.sum().backward()
    for got, want in zip((p.grad for p in model.parameters()), expected):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-6)


def test_the_reward_is_read_at_the_last_real_token_whatever_the_padding():
    model = reward_model().eval()
    short, long = [1, 2, 7, 8], [1, 2, 9, 10, 11, 12, 13]
    alone = torch.stack([model(torch.tensor([s]), torch.tensor([len(s)]))[0] for s in (short, long)])
    idx, lengths = right_pad([short, long], pad=0)
    torch.testing.assert_close(model(idx, lengths), alone, rtol=1e-5, atol=1e-5)
    # left padding with an attention mask (how PPO lays out prompt + response) gives the same values
    left = torch.tensor([[0, 0, 0, *short]])
    values = model(left, attention_mask=torch.tensor([[0, 0, 0, 1, 1, 1, 1]]))
    torch.testing.assert_close(values[0, -1], alone[0], rtol=1e-5, atol=1e-5)


def test_training_learns_a_preference_it_was_never_told():
    model = reward_model()
    train, held_out = synthetic_rankings(96, seed=0), synthetic_rankings(24, seed=1)
    before = pairwise_accuracy(model, held_out, pad=0)["accuracy"]
    cfg = RewardConfig(learning_rate=1e-3, batch_size=8, epochs=2, eval_every=12, log_every=4)
    state = train_reward(model, train, held_out, cfg, pad=0)
    after = pairwise_accuracy(model, held_out, pad=0)
    assert after["accuracy"] > 0.85 and after["accuracy"] > before + 0.2
    assert state.history[0]["step"] == 0 and "val_accuracy" in state.history[-1]
    assert all(math.isfinite(h.get("loss", 0.0)) for h in state.history)


def test_normalisation_centres_reference_rewards_and_folding_keeps_the_outputs():
    model = reward_model()
    reference = [list(s) for r in synthetic_rankings(10) for s in r.sequences]
    stats = normalise(model, reference, pad=0)
    rewards = score(model, reference, pad=0)
    assert abs(rewards.mean().item()) < 1e-4 and abs(rewards.std().item() - 1) < 1e-4
    assert stats["raw_std"] > 0
    idx, lengths = right_pad(reference, pad=0)
    before = model.eval()(idx, lengths)
    model.fold_normalisation()
    assert model.gain.item() == 1.0 and model.bias.item() == 0.0
    torch.testing.assert_close(model(idx, lengths), before, rtol=1e-4, atol=1e-4)


def test_save_and_load_round_trip_and_a_policy_is_not_a_reward_model(tmp_path):
    model = reward_model()
    normalise(model, [[1, 2, 3], [1, 2, 5, 5]], pad=0)
    save_reward_model(model, tmp_path / "rm", info={"val_accuracy": 0.9})
    loaded = load_reward_model(tmp_path / "rm")
    for name, value in model.state_dict().items():
        torch.testing.assert_close(loaded.state_dict()[name], value, rtol=0, atol=0)
    save_checkpoint(GPT(CONFIG), tmp_path / "policy")
    with pytest.raises(InstructflowError, match="not a reward model"):
        load_reward_model(tmp_path / "policy")


def test_bad_rankings_are_clear_errors():
    with pytest.raises(InstructflowError, match="at least 2 responses"):
        Ranking(((1, 2),), (0,))
    with pytest.raises(InstructflowError, match="none of these rankings has a comparison"):
        collate_rankings([Ranking(((1,), (2,)), (0, 0))], pad=0, block_size=8)
    with pytest.raises(InstructflowError, match="comparisons dataset is empty"):
        train_reward(reward_model(), [], [], RewardConfig(), pad=0)
    with pytest.raises(InstructflowError, match="tie_target"):
        RewardConfig(tie_target=2.0)
