"""Experiment: does a small review-pretrained model learn a task from K examples in its context?

Generative tasks built from the review sentences' words, scored by exact match and token F1 of a greedy answer
(model/fewshot.py), at K = 0, 1, 4 on 200 test sentences:

  sent    "Review: <sentence>\\nSentiment:" -> " positive" / " negative" (the label words must come from the examples)
  repeat  "Say: w1 w2 w3\\nAnswer:" -> " w1 w2 w3" (copying, what induction heads do)
  first   "Words: w1 w2 w3 w4\\nFirst:" -> " w1"
  last    "Words: w1 w2 w3 w4\\nLast:" -> " w4"

    .venv/bin/python -m experiments.fewshot_probe CHECKPOINT_DIR TOKENIZER_JSON sent,repeat,first,last
"""

from __future__ import annotations

import re
import sys
import time

import torch

from model.checkpoint import load_checkpoint
from model.fewshot import EvalExample, evaluate_queries, summarize
from model.tokenizer import Tokenizer

WORD = re.compile(r"[a-z]+")


def examples(kind: str, rows) -> list[EvalExample]:
    out = []
    for row in rows:
        words = [w for w in WORD.findall(row.fields[0].lower()) if len(w) > 2]
        if len(words) < 4:
            continue
        if kind == "sent":
            out.append(EvalExample(f"Review: {row.fields[0]}\nSentiment:",
                                   target=" positive" if row.label == 1 else " negative"))
        elif kind == "repeat":
            out.append(EvalExample(f"Say: {' '.join(words[:3])}\nAnswer:", target=" " + " ".join(words[:3])))
        elif kind in ("first", "last"):
            out.append(EvalExample(f"Words: {' '.join(words[:4])}\n{kind.title()}:",
                                   target=" " + words[0 if kind == "first" else 3]))
    return out


def main() -> None:
    from tasks.labelled import load_task

    checkpoint, tokenizer_path, kinds = sys.argv[1], sys.argv[2], sys.argv[3].split(",")
    torch.set_num_threads(2)
    model, _ = load_checkpoint(checkpoint)
    tokenizer = Tokenizer.load(tokenizer_path)
    task = load_task("sentiment")
    for kind in kinds:
        pool, queries = examples(kind, task.train), examples(kind, task.test)[:200]
        for k in (0, 1, 4):
            started = time.perf_counter()
            records = evaluate_queries(model, tokenizer.encode, tokenizer.decode, pool, queries, k, separator="\n\n",
                                       max_new_tokens=8, stop_tokens=[tokenizer.eot_id])
            s = summarize(records)
            print(f"{kind:<7} K={k}  exact match {s['exact_match']:.3f}  F1 {s['f1']:.3f}  n={len(records)}  "
                  f"e.g. {[r['prediction'] for r in records[:2]]}  ({time.perf_counter() - started:.0f} s)", flush=True)


if __name__ == "__main__":
    main()
