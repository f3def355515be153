"""Labelled tasks: the built-in sets from their carriers, and a user's own files with every mistake named."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pytest

from model.errors import InstructflowError
from model.tokenizer import Tokenizer
from tasks.labelled import eval_examples, finetune_examples, load_task


def jsonl(path: Path, rows: list[dict]) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def test_builtin_sentiment_is_the_real_balanced_set(monkeypatch):
    task = load_task("sentiment")
    assert len(task.train) + len(task.test) == 4000 and task.chance == 0.5
    assert sum(r.label for r in task.train + task.test) == 2000
    assert 300 < len(task.test) < 500  # 10% held out by a hash of the text
    assert load_task("sentiment").test == task.test  # the split is fixed


def test_a_user_file_with_a_split_column_and_declared_labels(tmp_path):
    rows = [{"premise": f"p{i}", "hypothesis": f"h{i}", "label": ["yes", "no"][i % 2],
             "split": "test" if i < 2 else "train"} for i in range(8)]
    task = load_task(jsonl(tmp_path / "nli.jsonl", rows), kind="entailment", text_fields=["premise", "hypothesis"],
                     labels=["yes", "no"])
    assert (len(task.train), len(task.test)) == (6, 2) and task.labels == ("yes", "no")
    assert sorted((r.fields, r.label) for r in task.test) == [(("p0", "h0"), 0), (("p1", "h1"), 1)]
    prompt = eval_examples(task, sorted(task.test, key=lambda r: r.fields))[0]
    assert prompt.context == "premise: p0\nhypothesis: h0\nAnswer:" and prompt.options == (" yes", " no")


def test_a_multiple_choice_parquet_file(tmp_path):
    frame = pd.DataFrame({"question": [f"q{i}" for i in range(6)], "options": [["a", "b", "c"]] * 6,
                          "label": [0, 1, 2, 0, 1, 2], "split": ["train"] * 4 + ["test"] * 2})
    frame.to_parquet(tmp_path / "mc.parquet")
    task = load_task(str(tmp_path / "mc.parquet"), kind="multiple_choice", text_fields=["question"])
    assert task.n_classes == 3 and task.chance == pytest.approx(1 / 3) and task.test[0].options == ("a", "b", "c")


@pytest.mark.parametrize("rows, options, message", [
    ([{"text": "a"}], {}, r"no field\(s\) \['label'\]"),
    ([{"text": "a", "label": "x"}], {"labels": ["y", "z"]}, r"label\(s\) \['x'\] are not among"),
    ([{"text": "", "label": "y"}], {}, "row 1: field 'text' is empty"),
    ([{"text": "a", "label": "y", "split": "train"}], {}, "empty test split"),
    ([{"text": "a", "label": "y", "split": "dev"}], {}, "only 'train' and 'test'"),
])
def test_bad_task_files_get_clear_errors(tmp_path, rows, options, message):
    with pytest.raises(InstructflowError, match=message):
        load_task(jsonl(tmp_path / "t.jsonl", rows), kind="classification", **options)


def test_bad_names_kinds_and_options(tmp_path):
    with pytest.raises(InstructflowError, match="neither a built-in task"):
        load_task(str(tmp_path / "missing.jsonl"))
    path = jsonl(tmp_path / "t.jsonl", [{"text": "a", "label": 0}])
    with pytest.raises(InstructflowError, match="give its kind"):
        load_task(path)
    mc = jsonl(tmp_path / "mc.jsonl", [{"text": "q", "options": ["a", "b"], "label": 2}])
    with pytest.raises(InstructflowError, match="not an option index 0..1"):
        load_task(mc, kind="multiple_choice")
    (tmp_path / "broken.jsonl").write_text("{not json\n")
    with pytest.raises(InstructflowError, match="is not valid jsonl"):
        load_task(str(tmp_path / "broken.jsonl"), kind="classification")


def test_over_long_examples_are_truncated_and_counted_and_gpt2_encoding_is_refused(tmp_path, gpt2_tokenizer):
    rows = [{"text": "word " * n, "label": "a" if n % 2 else "b", "split": "train" if n < 8 else "test"}
            for n in range(1, 11)]
    task = load_task(jsonl(tmp_path / "t.jsonl", rows), kind="classification")
    tokenizer = Tokenizer.train(["word " * 50, "other words here"], vocab_size=300)
    examples = finetune_examples(task, task.train, tokenizer, max_len=6)
    expected = [len(tokenizer.encode(r.fields[0])) > 4 for r in task.train]  # 6 = start + 4 tokens + extract
    assert [ex.truncated for ex in examples] == expected and any(expected) and not all(expected)
    assert all(len(ex.sequences[0]) <= 6 for ex in examples)
    with pytest.raises(InstructflowError, match="kind=bpe reserves them"):
        finetune_examples(task, task.train, gpt2_tokenizer, max_len=64)


def test_prefixes_of_a_label_sorted_file_are_random_samples(tmp_path):
    """Files are often sorted by label; max_train_examples/max_examples take prefixes, which must mix the classes."""
    rows = [{"text": f"text {i}", "label": "pos" if i < 200 else "neg"} for i in range(400)]
    task = load_task(jsonl(tmp_path / "sorted.jsonl", rows), kind="classification")
    first = [r.label for r in task.train[:50]]
    assert 10 < sum(first) < 40
    assert task.train == load_task(jsonl(tmp_path / "sorted.jsonl", rows), kind="classification").train  # seeded
