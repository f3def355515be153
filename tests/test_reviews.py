"""The demo's feedback task (continuing a movie review, judged by a hidden sentiment preference) and the intervals
every reported figure carries."""

from __future__ import annotations

import math

import pytest

from model.errors import InstructflowError
from tasks import reviews
from tasks.stats import mean_interval, proportion_interval, with_interval


def test_a_sentence_becomes_an_opening_and_its_continuation():
    prompt, response = reviews.continuation("the rock is destined to be the 21st century's new conan")
    assert prompt == "Continue the review: the rock is destined" and response == "to be the 21st century's new conan"
    assert reviews.is_review_prompt(prompt) and not reviews.is_review_prompt("Add 3 and 4")
    assert reviews.continuation("too short to use") is None
    long = " ".join(f"w{i}" for i in range(40))
    assert len(reviews.continuation(long)[1].split()) == reviews.MAX_WORDS - reviews.PROMPT_WORDS


def test_judging_prompts_come_from_sentences_nothing_trained_on():
    train = {pair[0] for pair in map(reviews.continuation, (s for s, _ in reviews._sentences("train"))) if pair}
    assert set(reviews.review_prompts("train", 3000)) <= train
    test = reviews.review_prompts("test", 300)
    assert len(test) == len(set(test)) == 300 and all(reviews.is_review_prompt(p) for p in test)
    demonstrations = reviews.review_demonstrations(3000, 200)
    seen = {d.prompt for d in demonstrations.train + demonstrations.test}
    assert seen <= train and not seen & set(test) and not train & set(test)
    assert not {d.prompt for d in demonstrations.train} & {d.prompt for d in demonstrations.test}
    with pytest.raises(InstructflowError, match="test review prompts exist"):
        reviews.review_prompts("test", 10_000)


def test_the_gold_preference_is_favourable_sentiment_and_fixed():
    score = reviews.sentiment_preference
    prompt = "Continue the review: the film is a"
    assert score(prompt, "great , funny and beautiful performances") > score(prompt, "dull , boring and bad script")
    assert score(prompt, "an odd film") == score("Continue the review: other words", "an odd film")  # the answer only
    reviews.gold_weights.cache_clear()  # read back from its cache file: the same numbers
    assert score(prompt, "a moving , heartfelt story") == score(prompt, "a moving , heartfelt story")
    # a sentiment classifier worth simulating a person with: well above chance on the held-out sentences
    test = reviews._sentences("test")
    accuracy = sum((score("", text) > 0) == bool(label) for text, label in test) / len(test)
    assert accuracy > 0.65


def test_intervals():
    low, high = proportion_interval(50, 100)
    assert math.isclose(low, 0.4038, abs_tol=1e-4) and math.isclose(high, 0.5962, abs_tol=1e-4)
    assert proportion_interval(0, 10)[0] == 0 and math.isclose(proportion_interval(10, 10)[1], 1)
    low, high = mean_interval([1.0, 0.0] * 50)
    assert math.isclose((low + high) / 2, 0.5) and math.isclose(high - 0.5, 1.96 * 0.50252 / 10, rel_tol=1e-3)
    assert with_interval(0.725, (0.681, 0.766), 400) == "72.5% [68.1, 76.6] (n=400)"
