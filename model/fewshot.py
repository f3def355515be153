"""Zero-, one- and few-shot evaluation without gradient updates (GPT-2 §3, GPT-3 §2.4).

A task example is a natural-language `context` and either answer `options` (multiple choice, scored by the
model's likelihood of each option) or a `target` (generative, scored by exact match and token F1 of a greedy
completion). K solved training examples go before the query, separated by `separator` (GPT-3: "\n\n", or
"\n" for short examples), as many as the context window takes.

Option scores (GPT-3 §2.4):
  sum            log P(option | context)
  mean           log P(option | context) / number of option tokens (the per-token normalisation)
  unconditional  log P(option | context) - log P(option | answer_context), e.g. answer_context = "Answer:";
                 it discounts options that are likely whatever the question
"""

from __future__ import annotations

import re
import string
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from model.errors import InstructflowError
from model.generate import generate

SCORINGS = ("sum", "mean", "unconditional")


@dataclass(frozen=True)
class EvalExample:
    context: str  # the prompt for this example, e.g. "Review: a gem of a film\nSentiment:"
    options: tuple[str, ...] = ()  # multiple choice: the candidate completions, e.g. (" negative", " positive")
    answer: int = -1  # index of the right option
    target: str = ""  # generative: the expected completion

    @property
    def completion(self) -> str:
        """The right completion, used when this example is shown as a solved demonstration."""
        return self.options[self.answer] if self.options else self.target


def check_examples(examples: Sequence[EvalExample], what: str) -> None:
    if not examples:
        raise InstructflowError(f"the {what} split is empty: nothing to evaluate")
    for i, ex in enumerate(examples):
        if ex.options and not 0 <= ex.answer < len(ex.options):
            raise InstructflowError(f"{what} example {i} has answer {ex.answer}, not an index of its {len(ex.options)} options")
        if not ex.options and not ex.target:
            raise InstructflowError(f"{what} example {i} has neither options nor a target")


def demonstration(example: EvalExample) -> str:
    return example.context + example.completion


def build_prompt(shots: Sequence[EvalExample], query: EvalExample, separator: str = "\n\n",
                 description: str = "") -> str:
    """[description] + K solved shots + the query's context, joined by `separator`."""
    parts = ([description] if description else []) + [demonstration(s) for s in shots] + [query.context]
    return separator.join(parts)


def draw_shots(pool_size: int, k: int, seed: int, index: int) -> list[int]:
    """Indices of K demonstrations for query `index`: random without replacement, fixed by (seed, index)."""
    if k > pool_size:
        raise InstructflowError(f"K={k} demonstrations requested but the training split has only {pool_size} examples")
    return list(np.random.default_rng([seed, index]).choice(pool_size, size=k, replace=False))


def max_shots(encode: Callable[[str], list[int]], pool: Sequence[EvalExample], queries: Sequence[EvalExample],
              context_len: int, separator: str = "\n\n", max_answer_tokens: int = 0) -> int:
    """How many demonstrations of typical (median) length fit beside a typical query and its longest answer.

    Typical, not worst case: one very long query should not cap K for all the others (a query whose draw
    does not fit gets fewer demonstrations, and the mean K actually used is reported).
    """
    sep = len(encode(separator))
    shot = float(np.median([len(encode(demonstration(s))) + sep for s in pool]))
    query = float(np.median([len(encode(q.context)) + max([len(encode(o)) for o in q.options] or [max_answer_tokens])
                             for q in queries]))
    return max(0, int((context_len - query) // shot))


def fit_prompt(encode: Callable[[str], list[int]], shots: Sequence[EvalExample], query: EvalExample, budget: int,
               separator: str = "\n\n", description: str = "") -> tuple[list[int], int]:
    """Prompt tokens with as many of `shots` as fit in `budget` (dropping from the front); returns (ids, K used)."""
    for start in range(len(shots) + 1):
        ids = encode(build_prompt(shots[start:], query, separator, description))
        if len(ids) <= budget:
            return ids, len(shots) - start
    # the query alone is too long: keep its end (the question sits there); counted as truncated by the caller
    return ids[len(ids) - budget:], 0


@torch.no_grad()
def completion_logprobs(model: torch.nn.Module, contexts: Sequence[list[int]],
                        completions: Sequence[list[int]]) -> list[tuple[float, int, bool]]:
    """(log P(completion | context), completion tokens, whether greedy decoding would produce it), batched.

    Each pair is one right-padded row; `model(ids)` returns (logits, ...) as GPT does. Row i's completion
    token t is predicted at position len(context) - 1 + t.
    """
    if len(contexts) != len(completions):
        raise ValueError("one completion per context")
    rows = [list(c) + list(x) for c, x in zip(contexts, completions)]
    if any(not x for x in completions):
        raise InstructflowError("an answer option encodes to no tokens; options must be non-empty text")
    if any(not c for c in contexts):
        raise InstructflowError("an empty context cannot condition a completion; give the prompt some text")
    device = next(model.parameters()).device
    T = max(len(r) for r in rows)
    ids = torch.zeros((len(rows), T), dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, :len(r)] = torch.tensor(r)
    logits = model(ids.to(device))[0].float()  # (B, T, V)
    logprobs = F.log_softmax(logits, dim=-1)
    out = []
    for i, (c, x) in enumerate(zip(contexts, completions)):
        positions = torch.arange(len(c) - 1, len(c) - 1 + len(x), device=device)
        targets = torch.tensor(x, device=device)
        chosen = logprobs[i, positions, targets]
        greedy = bool((logprobs[i, positions].argmax(-1) == targets).all())
        out.append((chosen.sum().item(), len(x), greedy))
    return out


def option_scores(model: torch.nn.Module, context: list[int], options: Sequence[list[int]],
                  answer_context: list[int] | None = None) -> dict[str, list[float]]:
    """Each option's score under every scoring rule in SCORINGS (unconditional only with an answer_context)."""
    conditional = completion_logprobs(model, [context] * len(options), options)
    scores = {"sum": [lp for lp, _, _ in conditional], "mean": [lp / n for lp, n, _ in conditional]}
    if answer_context:
        baseline = completion_logprobs(model, [answer_context] * len(options), options)
        scores["unconditional"] = [lp - base for (lp, _, _), (base, _, _) in zip(conditional, baseline)]
    return scores


def normalize_answer(text: str) -> str:
    """SQuAD's answer normalisation: lower case, no punctuation, no articles, single spaces."""
    text = "".join(ch for ch in text.lower() if ch not in set(string.punctuation))
    text = re.sub(r"\b(a|an|the)\b", " ", text)
    return " ".join(text.split())


def exact_match(prediction: str, target: str) -> float:
    return float(normalize_answer(prediction) == normalize_answer(target))


def token_f1(prediction: str, target: str) -> float:
    """F1 of the bag of normalised words (SQuAD / CoQA / DROP style)."""
    pred, gold = normalize_answer(prediction).split(), normalize_answer(target).split()
    if not pred or not gold:
        return float(pred == gold)
    common = sum((Counter(pred) & Counter(gold)).values())
    if common == 0:
        return 0.0
    precision, recall = common / len(pred), common / len(gold)
    return 2 * precision * recall / (precision + recall)


def greedy_completion(model: torch.nn.Module, prompt: list[int], max_new_tokens: int, stop_tokens: Sequence[int],
                      decode: Callable[[list[int]], str]) -> str:
    """The greedy continuation of `prompt`, cut at the first newline (answers are one line)."""
    room = model.config.block_size - len(prompt)
    new = generate(model, [prompt], max(1, min(max_new_tokens, room)), temperature=0.0, stop_tokens=list(stop_tokens))[0]
    return decode([t for t in new if t not in stop_tokens]).split("\n")[0].strip()


def evaluate_queries(
    model: torch.nn.Module,
    encode: Callable[[str], list[int]],
    decode: Callable[[list[int]], str],
    pool: Sequence[EvalExample],
    queries: Sequence[EvalExample],
    k: int,
    *,
    seed: int = 0,
    separator: str = "\n\n",
    description: str = "",
    answer_context: str = "",
    max_new_tokens: int = 16,
    stop_tokens: Sequence[int] = (),
    on_result: Callable[[dict], None] = lambda record: None,
    start: int = 0,
) -> list[dict]:
    """Score `queries[start:]` with K demonstrations from `pool`; one record per query, also passed to on_result.

    A record holds the query index, K actually used (fewer when a long draw did not fit), whether the prompt
    had to be cut, and per scoring rule whether the model chose the right option (or EM/F1 for generation).
    """
    check_examples(queries, "evaluation")
    if k:
        check_examples(pool, "training")
    context_len = model.config.block_size
    fits = max_shots(encode, pool, queries, context_len, separator, max_new_tokens) if k else 0
    if k > fits:
        raise InstructflowError(
            f"K={k} demonstrations do not fit: about {fits} of this task's examples fit beside a query in the "
            f"model's {context_len}-token context; lower K or use a model with a longer context"
        )
    answer_ids = encode(answer_context) if answer_context else None
    was_training = model.training
    model.eval()
    records = []
    for index in range(start, len(queries)):
        query = queries[index]
        shots = [pool[i] for i in draw_shots(len(pool), k, seed, index)]
        option_ids = [encode(o) for o in query.options]
        room = max([len(o) for o in option_ids] or [max_new_tokens])
        prompt, used = fit_prompt(encode, shots, query, context_len - room, separator, description)
        record = {"index": index, "k": used, "prompt_tokens": len(prompt),
                  "truncated": used == 0 and len(encode(build_prompt([], query, separator, description))) > context_len - room}
        if query.options:
            scores = option_scores(model, prompt, option_ids, answer_ids)
            for rule, values in scores.items():
                record[f"correct_{rule}"] = int(int(np.argmax(values)) == query.answer)
        else:
            prediction = greedy_completion(model, prompt, max_new_tokens, stop_tokens, decode)
            record.update(prediction=prediction, exact_match=exact_match(prediction, query.target),
                          f1=token_f1(prediction, query.target))
        records.append(record)
        on_result(record)
    model.train(was_training)
    return records


def summarize(records: Sequence[dict]) -> dict[str, float]:
    """Mean of every score over the records: accuracy_<rule>, exact_match, f1, and the mean K used."""
    if not records:
        return {}
    out = {"examples": float(len(records)), "mean_k": float(np.mean([r["k"] for r in records])),
           "truncated": float(sum(r["truncated"] for r in records))}
    for key in records[0]:
        if key.startswith("correct_"):
            out["accuracy_" + key.removeprefix("correct_")] = float(np.mean([r[key] for r in records]))
        elif key in ("exact_match", "f1"):
            out[key] = float(np.mean([r[key] for r in records]))
    return out
