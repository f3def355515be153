"""GPT forward pass: attention masks against their definitions, cached vs naive generation, left padding."""

import pytest
import torch

from model.config import GPTConfig
from model.errors import InstructflowError
from model.generate import categorical, filter_logits, generate
from model.gpt import GPT, attention_masks


def small(**overrides) -> GPT:
    torch.manual_seed(0)
    values = dict(vocab_size=101, block_size=64, n_layer=4, n_head=4, n_embd=32, dropout=0.0)
    values.update(overrides)
    model = GPT(GPTConfig(**values)).eval()
    with torch.no_grad():  # larger weights than the 0.02 init, so small numerical differences would show
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.2)
    return model


def test_sparse_mask_is_the_strided_pattern():
    config = GPTConfig(block_size=32, n_layer=2, n_head=2, n_embd=8, attention="alternating", sparse_stride=4)
    band = attention_masks(config, T=20, past=0, attention_mask=None, device="cpu")["sparse"][0, 0]
    for i in range(20):
        for j in range(20):
            expected = j <= i and (i - j < 4 or (i - j) % 4 == 0)
            assert band[i, j].item() == expected, (i, j)


def test_sparse_layers_change_attention_only_beyond_the_stride():
    dense = small(attention="dense")
    sparse = small(attention="alternating", sparse_stride=8)  # same seed: same weights
    ids = torch.randint(0, 101, (2, 40))
    short_dense, _ = dense(ids[:, :8])
    short_sparse, _ = sparse(ids[:, :8])
    torch.testing.assert_close(short_dense, short_sparse)  # within the band, every token is visible anyway
    long_dense, _ = dense(ids)
    long_sparse, _ = sparse(ids)
    assert (long_dense[:, 20:] - long_sparse[:, 20:]).abs().max() > 1e-3


@pytest.mark.parametrize("norm", ["pre", "post"])
@pytest.mark.parametrize("attention", ["dense", "alternating"])
def test_incremental_forward_with_cache_matches_full_forward(norm, attention):
    model = small(norm=norm, attention=attention, sparse_stride=4)
    ids = torch.randint(0, 101, (3, 24))
    full, _ = model(ids)
    cache = model.new_cache(3)
    pieces = [model(ids[:, :10], cache=cache)[0]] + [model(ids[:, t:t + 1], cache=cache)[0] for t in range(10, 24)]
    torch.testing.assert_close(torch.cat(pieces, dim=1), full, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("attention", ["dense", "alternating"])
@pytest.mark.parametrize("sampling", [dict(temperature=0.0), dict(temperature=0.9, top_k=20, top_p=0.9, seed=7)])
def test_cached_generation_gives_identical_tokens(attention, sampling):
    model = small(attention=attention, sparse_stride=4)
    prompts = [[5, 9, 2, 44, 17], [3], [8, 8, 8, 1, 0, 99, 12]]
    cached = generate(model, prompts, 30, use_cache=True, **sampling)
    naive = generate(model, prompts, 30, use_cache=False, **sampling)
    assert cached == naive
    assert all(len(tokens) == 30 for tokens in cached)


def test_left_padding_does_not_change_a_prompts_continuation():
    model = small(attention="alternating", sparse_stride=4)
    prompts = [[5, 9, 2, 44, 17, 3, 3, 60], [3, 70], [8, 8, 1]]
    batched = generate(model, prompts, 20, temperature=0.0, pad_token=100)
    alone = [generate(model, [p], 20, temperature=0.0)[0] for p in prompts]
    assert batched == alone


def test_seed_makes_sampling_repeatable_and_stop_tokens_end_sequences():
    model = small()
    prompts = [[1, 2, 3]] * 4
    first = generate(model, prompts, 25, temperature=1.0, seed=3)
    assert first == generate(model, prompts, 25, temperature=1.0, seed=3)
    assert first != generate(model, prompts, 25, temperature=1.0, seed=4)
    stop = first[0][4]  # a token the first sequence does produce
    stopped = generate(model, prompts, 25, temperature=1.0, seed=3, stop_tokens=[stop])
    assert stopped[0] == first[0][: first[0].index(stop) + 1]
    for row in stopped:
        assert stop not in row[:-1]  # nothing after a stop token


def test_top_k_and_top_p_filters():
    logits = torch.log(torch.tensor([[0.5, 0.25, 0.15, 0.1]]))
    assert torch.isinf(filter_logits(logits, top_k=2)).tolist() == [[False, False, True, True]]
    assert torch.isinf(filter_logits(logits, top_p=0.7)).tolist() == [[False, False, True, True]]
    assert torch.isinf(filter_logits(logits, top_p=0.76)).tolist() == [[False, False, False, True]]
    assert torch.isinf(filter_logits(logits, top_p=0.01)).tolist() == [[False, True, True, True]]


def test_too_long_and_empty_inputs_are_clear_errors():
    model = small()
    with pytest.raises(InstructflowError, match="longer than the model's context of 64"):
        model(torch.zeros(1, 65, dtype=torch.long))
    with pytest.raises(InstructflowError, match="prompt 1 is empty"):
        generate(model, [[1, 2], []], 5)
    with pytest.raises(InstructflowError, match="exceeds the model's context"):
        generate(model, [[1] * 60], 5)
    with pytest.raises(InstructflowError, match="no prompts"):
        generate(model, [], 5)


def test_loss_ignores_masked_targets():
    model = small()
    ids = torch.randint(0, 101, (2, 10))
    targets = ids.roll(-1, dims=1)
    _, loss_all = model(ids, targets)
    masked = targets.clone()
    masked[:, :5] = -100
    logits, loss_part = model(ids, masked)
    manual = torch.nn.functional.cross_entropy(logits[:, 5:].reshape(-1, 101), targets[:, 5:].reshape(-1))
    torch.testing.assert_close(loss_part, manual)
    assert not torch.isclose(loss_all, loss_part)


def test_a_categorical_draw_follows_the_probabilities_and_never_picks_an_impossible_token():
    probs = torch.tensor([[0.0, 0.5, 0.0, 0.2, 0.3, 0.0]]).expand(200_000, 6)
    drawn = categorical(probs, torch.Generator().manual_seed(0))
    counts = torch.bincount(drawn, minlength=6).double() / len(drawn)
    assert counts[[0, 2, 5]].sum() == 0  # probability 0, never drawn (the first and last tokens included)
    torch.testing.assert_close(counts, probs[0].double(), atol=0.005, rtol=0)  # 5 standard errors at n = 200k
    again = categorical(probs[:8], torch.Generator().manual_seed(0))
    assert again.tolist() == drawn[:8].tolist()  # the generator's seed fixes the draws
