"""Zero/one/few-shot evaluation of a checkpoint on many tasks, one Ray task per (task, K), results kept as they come.

Every (task, K) pair appends one JSON line per scored query to `records/<task>-k<K>.jsonl`, so a crash or a
stopped run keeps what was scored and a re-run continues after the last complete line. A pair that fails
is reported as partial (with its error) while the other pairs finish; the caller decides what a partial
result means for the stage.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from model.checkpoint import load_checkpoint
from model.errors import InstructflowError
from model.fewshot import EvalExample, evaluate_queries, max_shots, summarize
from model.files import atomic_write
from model.tokenizer import Tokenizer
from tasks.labelled import LabelledTask, eval_examples


def write_inputs(path: Path, task: LabelledTask, max_examples: int | None) -> Path:
    """The task's demonstration pool (train) and queries (test, the first max_examples) as prompts, for workers."""
    queries = eval_examples(task, task.test[:max_examples] if max_examples else task.test)
    payload = {"name": task.name, "separator": task.separator, "answer_context": task.answer_context,
               "chance": task.chance, "pool": [q.__dict__ for q in eval_examples(task, task.train)],
               "queries": [q.__dict__ for q in queries]}
    return atomic_write(path, json.dumps(payload).encode())


def read_inputs(path: str | Path) -> tuple[dict, list[EvalExample], list[EvalExample]]:
    """The inputs file written by write_inputs: (its payload, the demonstration pool, the queries)."""
    payload = json.loads(Path(path).read_text())
    pool, queries = ([EvalExample(i["context"], tuple(i["options"]), i["answer"], i["target"]) for i in payload[part]]
                     for part in ("pool", "queries"))
    return payload, pool, queries


def read_records(path: Path) -> list[dict]:
    """Complete JSON lines of a records file; a torn last line (the process died mid-write) is dropped."""
    if not path.exists():
        return []
    records = []
    for line in path.read_text().splitlines():
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            break
    with open(path, "w") as f:  # rewrite without the torn tail so appends continue cleanly
        f.writelines(json.dumps(r) + "\n" for r in records)
    return records


def evaluate_pair(checkpoint: str, tokenizer_path: str, inputs: str, k: int, seed: int, records_path: str,
                  max_new_tokens: int = 16) -> dict:
    """Score one task at one K (resuming its records file); returns the summary."""
    torch.set_num_threads(1)
    payload, pool, queries = read_inputs(inputs)
    tokenizer = Tokenizer.load(tokenizer_path)
    model, _ = load_checkpoint(checkpoint)
    path = Path(records_path)
    path.parent.mkdir(parents=True, exist_ok=True)
    done = read_records(path)
    with open(path, "a") as out:
        def keep(record: dict) -> None:
            out.write(json.dumps(record) + "\n")
            out.flush()

        new = evaluate_queries(model, tokenizer.encode, tokenizer.decode, pool, queries, k, seed=seed,
                               separator=payload["separator"], answer_context=payload["answer_context"],
                               max_new_tokens=max_new_tokens, stop_tokens=[tokenizer.eot_id], on_result=keep,
                               start=len(done))
    return {**summarize(done + new), "chance": payload["chance"], "resumed_at": len(done)}


def shots_that_fit(inputs: dict[str, Path], tokenizer_path: Path, context_len: int, max_new_tokens: int) -> dict[str, int]:
    """For each task, how many demonstrations of typical length fit beside a typical query (model.fewshot.max_shots)."""
    tokenizer = Tokenizer.load(tokenizer_path)
    fits = {}
    for name, path in inputs.items():
        payload, pool, queries = read_inputs(path)
        fits[name] = max_shots(tokenizer.encode, pool, queries, context_len, payload["separator"], max_new_tokens) \
            if pool else 0
    return fits


def evaluate_many(checkpoint: Path, tokenizer_path: Path, inputs: dict[str, Path], shots: dict[str, list[int]],
                  out: Path, seed: int, max_new_tokens: int = 16) -> dict[str, dict]:
    """Every (task, K) in `shots` as its own Ray task; returns {"<task>/k<K>": summary}, failed pairs marked partial."""
    import ray

    from tasks.ray_train import ensure_ray

    ensure_ray()
    remote = ray.remote(num_cpus=1, max_retries=0)(evaluate_pair)
    futures = {}
    for name, path in inputs.items():
        for k in shots[name]:
            records = out / "records" / f"{name}-k{k}.jsonl"
            futures[f"{name}/k{k}"] = (remote.remote(str(checkpoint), str(tokenizer_path), str(path), k, seed,
                                                     str(records), max_new_tokens), records)
    results = {}
    for pair, (future, records) in futures.items():
        try:
            results[pair] = {**ray.get(future), "partial": False}
        except Exception as e:  # keep the other pairs; this one keeps what it scored
            cause = getattr(e, "cause", None) or e
            message = str(cause) if isinstance(cause, InstructflowError) else f"{type(cause).__name__}: {cause}"
            done = read_records(records)
            results[pair] = {**summarize(done), "partial": True, "error": message.splitlines()[0][:500]}
    return results
