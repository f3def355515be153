"""Evaluation keeps every scored example: a stopped (task, K) pair resumes after its last complete record."""

from __future__ import annotations

import json

import torch

from model.checkpoint import save_checkpoint
from model.config import GPTConfig
from model.gpt import GPT
from model.tokenizer import Tokenizer
from tasks.evaluate import evaluate_pair, read_records, write_inputs
from tasks.labelled import LabelledTask, Row


def test_a_torn_records_file_resumes_after_its_last_complete_line(tmp_path):
    tokenizer = Tokenizer.train(["the film was good. the film was bad. " * 30], vocab_size=300)
    tokenizer.save(tmp_path / "tok.json")
    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=tokenizer.vocab_size, block_size=64, n_layer=1, n_head=2, n_embd=16))
    save_checkpoint(model, tmp_path / "ckpt")
    rows = [Row((f"the film was {w}",), i % 2) for i, w in enumerate(["good", "bad"] * 5)]
    task = LabelledTask("films", "classification", ("bad", "good"), "Review: {0}\nSentiment:", ("bad", "good"),
                        train=rows[:4], test=rows[4:])
    inputs = write_inputs(tmp_path / "films.json", task, None)
    records = tmp_path / "records" / "films-k1.jsonl"
    full = evaluate_pair(str(tmp_path / "ckpt"), str(tmp_path / "tok.json"), str(inputs), 1, 0, str(records))
    lines = records.read_text().splitlines()
    assert full["examples"] == 6 and len(lines) == 6

    records.write_text("\n".join(lines[:3]) + "\n" + lines[3][:10])  # died while writing the 4th record
    assert [r["index"] for r in read_records(records)] == [0, 1, 2]
    resumed = evaluate_pair(str(tmp_path / "ckpt"), str(tmp_path / "tok.json"), str(inputs), 1, 0, str(records))
    assert resumed["resumed_at"] == 3 and records.read_text().splitlines() == lines  # the same records, once each
    assert {k: v for k, v in resumed.items() if k != "resumed_at"} == {k: v for k, v in full.items() if k != "resumed_at"}
    assert json.loads(lines[0])["k"] == 1
