"""Zero/few-shot evaluation: prompt building, option scoring against hand-computed log-probabilities, answer metrics."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from model.config import GPTConfig
from model.errors import InstructflowError
from model.fewshot import (EvalExample, build_prompt, completion_logprobs, draw_shots, evaluate_queries, exact_match,
                           fit_prompt, option_scores, summarize, token_f1)
from model.gpt import GPT


class Bigram(nn.Module):
    """A language model whose next-token distribution depends on the previous token only, from a fixed table."""

    def __init__(self, probs: list[list[float]]) -> None:
        super().__init__()
        self.logp = nn.Parameter(torch.tensor(probs).log(), requires_grad=False)
        self.config = GPTConfig(vocab_size=len(probs), block_size=16, n_layer=1, n_head=1, n_embd=4)

    def forward(self, ids: torch.Tensor):
        return self.logp[ids], None  # (B, T, V): row t predicts token t + 1


# tokens: 0 = "Q", 1 = "yes", 2 = "no", 3 = "Answer"
TABLE = [
    [0.1, 0.6, 0.2, 0.1],  # after Q
    [0.25, 0.25, 0.25, 0.25],  # after yes
    [0.1, 0.1, 0.7, 0.1],  # after no
    [0.1, 0.2, 0.6, 0.1],  # after Answer
]


def test_option_scores_match_the_hand_computed_log_probabilities():
    model = Bigram(TABLE)
    scores = option_scores(model, [3, 0], [[1], [2, 2]], answer_context=[3])
    yes, no_no = math.log(0.6), math.log(0.2) + math.log(0.7)
    assert scores["sum"] == pytest.approx([yes, no_no])
    assert scores["mean"] == pytest.approx([yes, no_no / 2])
    # unconditional: subtract log P(option | "Answer"): yes 0.2; no no 0.6 * 0.7
    assert scores["unconditional"] == pytest.approx([yes - math.log(0.2), no_no - math.log(0.6) - math.log(0.7)])
    # which option wins depends on the rule: sum and mean prefer "yes", as does unconditional here
    assert max(range(2), key=lambda i: scores["sum"][i]) == 0


def test_batched_scoring_equals_one_row_at_a_time_on_a_real_gpt():
    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=50, block_size=32, n_layer=2, n_head=2, n_embd=16, dropout=0.0)).eval()
    contexts, completions = [[5, 6, 7], [8], [9, 10, 11, 12, 13]], [[20, 21], [22, 23, 24], [25]]
    batched = completion_logprobs(model, contexts, completions)
    for (c, x), (lp, n, _) in zip(zip(contexts, completions), batched):
        logits, _ = model(torch.tensor([c + x]))
        manual = sum(torch.log_softmax(logits[0, len(c) - 1 + t], -1)[x[t]].item() for t in range(len(x)))
        assert lp == pytest.approx(manual, abs=1e-4) and n == len(x)


def test_prompt_is_demonstrations_then_query_with_the_separator():
    shots = [EvalExample("Review: great\nSentiment:", (" negative", " positive"), 1),
             EvalExample("Review: awful\nSentiment:", (" negative", " positive"), 0)]
    query = EvalExample("Review: fine\nSentiment:", (" negative", " positive"), 1)
    assert build_prompt(shots, query, "\n") == (
        "Review: great\nSentiment: positive\nReview: awful\nSentiment: negative\nReview: fine\nSentiment:")
    assert build_prompt([], query, "\n\n", description="Classify.") == "Classify.\n\nReview: fine\nSentiment:"


def test_demonstrations_that_do_not_fit_are_dropped_from_the_front():
    encode = lambda text: list(text.encode())  # one token per byte
    shots = [EvalExample("aaaa", target="1"), EvalExample("bb", target="2")]
    ids, used = fit_prompt(encode, shots, EvalExample("q"), budget=len("bb2\nq"), separator="\n")
    assert bytes(ids) == b"bb2\nq" and used == 1


def test_shots_are_drawn_without_replacement_and_fixed_by_the_seed():
    assert draw_shots(10, 4, seed=1, index=3) == draw_shots(10, 4, seed=1, index=3)
    assert len(set(draw_shots(10, 10, seed=0, index=0))) == 10
    with pytest.raises(InstructflowError, match="only 3"):
        draw_shots(3, 4, seed=0, index=0)


def test_answer_metrics():
    assert exact_match("The Eiffel Tower.", "eiffel tower") == 1.0
    assert token_f1("the big red house", "red house") == pytest.approx(2 * (2 / 3) * 1 / (2 / 3 + 1))
    assert token_f1("blue", "red") == 0.0


def byte_model(block_size: int) -> GPT:
    torch.manual_seed(0)
    return GPT(GPTConfig(vocab_size=256, block_size=block_size, n_layer=1, n_head=2, n_embd=16, dropout=0.0))


def test_evaluation_is_deterministic_resumable_and_refuses_a_k_that_cannot_fit():
    encode, decode = (lambda text: list(text.encode())), (lambda ids: bytes(ids).decode(errors="replace"))
    pool = [EvalExample(f"n{i}:", (" a", " b"), i % 2) for i in range(20)]
    queries = [EvalExample(f"q{i}:", (" a", " b"), i % 2) for i in range(6)]
    model = byte_model(64)
    seen = []
    full = evaluate_queries(model, encode, decode, pool, queries, 2, seed=3, separator="\n", on_result=seen.append)
    assert seen == full and [r["k"] for r in full] == [2] * 6
    assert full == evaluate_queries(model, encode, decode, pool, queries, 2, seed=3, separator="\n")
    assert evaluate_queries(model, encode, decode, pool, queries, 2, seed=3, separator="\n", start=4) == full[4:]
    summary = summarize(full)
    assert summary["examples"] == 6 and 0 <= summary["accuracy_mean"] <= 1 and summary["mean_k"] == 2
    with pytest.raises(InstructflowError, match="do not fit"):
        evaluate_queries(model, encode, decode, pool, queries, 15, separator="\n")


def test_generative_queries_are_scored_by_exact_match_and_f1():
    encode, decode = (lambda text: list(text.encode())), (lambda ids: bytes(ids).decode(errors="replace"))
    queries = [EvalExample("2+2=", target=" 4")]
    records = evaluate_queries(byte_model(32), encode, decode, [], queries, 0, max_new_tokens=4, stop_tokens=[10])
    assert set(records[0]) >= {"prediction", "exact_match", "f1"} and records[0]["exact_match"] in (0.0, 1.0)
    with pytest.raises(InstructflowError, match="neither options nor a target"):
        evaluate_queries(byte_model(32), encode, decode, [], [EvalExample("x")], 0)
