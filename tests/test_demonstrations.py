"""SFT demonstrations: a user's jsonl/parquet file, and the built-in verifiable tasks with their checker."""

from __future__ import annotations

import json

import pandas as pd
import pytest

from model.errors import InstructflowError
from tasks.demonstrations import (FAMILY_NAMES, check, family_of, held_out_prompts, is_held_out, load_demonstrations,
                                  reference_answer, verifiable_demonstrations)

# --- the checker ---------------------------------------------------------------------------------


@pytest.mark.parametrize("prompt, right, wrong", [
    ("Reverse the word: apple", "elppa", ["apple", "Elppa", "elpa", "elppa."]),
    ("Uppercase: dog", "DOG", ["dog", "Dog", "DOGS"]),
    ("Add 3 and 4", "7", ["34", "7.", "seven", "8"]),
    ("Repeat 'ha' 3 times", "hahaha", ["haha", "ha ha ha", "hahahaha"]),
    ("First letter of river", "r", ["R", "ri", "river"]),
    ("Count the words: a b c", "3", ["2", "4", "three"]),
    ("Add 120 and 5", "125", ["12", "1205"]),  # outside the generated range: still checkable
])
def test_the_checker_accepts_the_right_answer_only(prompt, right, wrong):
    assert reference_answer(prompt) == right
    assert check(prompt, right) and check(prompt, f"  {right}\n")  # surrounding whitespace does not count
    for answer in wrong:
        assert not check(prompt, answer), answer


def test_a_prompt_of_no_family_cannot_be_checked():
    assert family_of("Uppercase: dog") == "uppercase" and family_of("Tell me a story") is None
    with pytest.raises(InstructflowError, match="not a verifiable prompt"):
        check("Tell me a story", "Once upon a time")
    with pytest.raises(InstructflowError, match="not a verifiable prompt"):
        check("Reverse the word: two words", "sdrow owt")  # one word only: not of the form, so not guessed at


# --- the built-in set ----------------------------------------------------------------------------


def test_the_built_in_set_is_deterministic_correct_and_covers_every_family():
    first, again, other = (verifiable_demonstrations(120, 30, seed) for seed in (0, 0, 1))
    assert first.train == again.train and first.test == again.test and first.sha256 == again.sha256
    assert first.train != other.train and first.sha256 != other.sha256
    assert len(first.train) == 120 and len(first.test) == 30
    assert {d.family for d in first.train} == set(FAMILY_NAMES) == {d.family for d in first.test}
    for d in first.train + first.test:
        assert check(d.prompt, d.response) and family_of(d.prompt) == d.family
    prompts = [d.prompt for d in first.train]
    assert len(set(prompts)) == len(prompts)


def test_held_out_prompts_are_never_training_prompts_whatever_the_seed_and_size():
    training = {d.prompt for seed in (0, 1, 2) for d in verifiable_demonstrations(1500, 1, seed).train}
    held_out = {p for seed in (0, 1, 2) for p in held_out_prompts(200, seed)}
    assert len(training) > 3000 and len(held_out) > 300  # large enough that most small families are used up
    assert training.isdisjoint(held_out)
    assert all(is_held_out(p) for p in held_out) and not any(is_held_out(p) for p in training)
    assert held_out_prompts(50, 4) == held_out_prompts(50, 4) and len(set(held_out_prompts(50, 4))) == 50
    assert {d.prompt for d in verifiable_demonstrations(10, 40, 4).test} == set(held_out_prompts(40, 4))


# --- a user's file -------------------------------------------------------------------------------


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_a_jsonl_file_with_splits_loads_as_given(tmp_path):
    path = write_jsonl(tmp_path / "demos.jsonl", [
        {"prompt": "Say hi", "response": "hi", "split": "train"},
        {"prompt": "Say 7", "response": "7", "split": "test"},
        {"prompt": "Say yes", "response": "yes", "split": "train"},
    ])
    demos = load_demonstrations(path)
    assert [(d.prompt, d.response) for d in demos.train] == [("Say hi", "hi"), ("Say yes", "yes")]
    assert [(d.prompt, d.response) for d in demos.test] == [("Say 7", "7")]  # "7" stays text
    assert demos.name == "demos"


def test_a_parquet_file_without_splits_is_split_by_prompt(tmp_path):
    rows = [{"prompt": f"Question {i % 50}", "response": f"answer {i}"} for i in range(200)]
    pd.DataFrame(rows).to_parquet(tmp_path / "demos.parquet")
    demos = load_demonstrations(tmp_path / "demos.parquet", test_fraction=0.2, seed=0)
    assert len(demos.train) + len(demos.test) == 200 and 0 < len(demos.test) < 100
    assert {d.prompt for d in demos.train}.isdisjoint({d.prompt for d in demos.test})  # a prompt in one split only
    assert load_demonstrations(tmp_path / "demos.parquet", test_fraction=0.2, seed=0).test == demos.test


@pytest.mark.parametrize("rows, message", [
    ([{"prompt": "a", "answer": "b"}], "line 1: no field 'response'.*has \\['answer', 'prompt'\\]"),
    ([{"prompt": "a", "response": "b"}, {"prompt": " ", "response": "c"}], "line 2: field 'prompt' is empty"),
    ([{"prompt": "a", "response": 3}], "line 1: field 'response' is empty or not text"),
    ([{"prompt": "a", "response": "b", "split": "val"}], "split 'val' is not one of train, test"),
    ([{"prompt": "a", "response": "b", "split": "train"}, {"prompt": "c", "response": "d"}], "line 2: no split"),
    ([{"prompt": "a", "response": "b", "split": "train"}], "the test split is empty \\(1 train, 0 test rows\\)"),
])
def test_bad_rows_are_named_with_the_fix(tmp_path, rows, message):
    with pytest.raises(InstructflowError, match=message):
        load_demonstrations(write_jsonl(tmp_path / "bad.jsonl", rows))


def test_bad_files_are_refused(tmp_path):
    with pytest.raises(InstructflowError, match="does not exist"):
        load_demonstrations(tmp_path / "missing.jsonl")
    (tmp_path / "demos.csv").write_text("prompt,response\na,b\n")
    with pytest.raises(InstructflowError, match="use a .jsonl or .parquet file"):
        load_demonstrations(tmp_path / "demos.csv")
    (tmp_path / "broken.jsonl").write_text('{"prompt": "a", "response": "b"}\n{"prompt": \n')
    with pytest.raises(InstructflowError, match="line 2: not valid JSON"):
        load_demonstrations(tmp_path / "broken.jsonl")
    (tmp_path / "empty.jsonl").write_text("\n")
    with pytest.raises(InstructflowError, match="has no rows"):
        load_demonstrations(tmp_path / "empty.jsonl")
    (tmp_path / "fake.parquet").write_text("not parquet")
    with pytest.raises(InstructflowError, match="not valid parquet"):
        load_demonstrations(tmp_path / "fake.parquet")
    pd.DataFrame([{"prompt": "a", "response": None}]).to_parquet(tmp_path / "none.parquet")
    with pytest.raises(InstructflowError, match="row 1: field 'response' is empty or not text"):
        load_demonstrations(tmp_path / "none.parquet")
