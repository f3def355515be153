"""Demonstrations for supervised fine-tuning (InstructGPT step 1): a user's prompt → response file, or a built-in set.

A user's file is jsonl (one JSON object a line) or parquet with the fields `prompt` and `response` (non-empty text)
and optionally `split` ("train" or "test"; given for every row or for none). Without it, a hash of each row's
prompt chooses the split, so one prompt never lands in both and adding rows never moves existing ones.

The built-in set (offline, deterministic from a seed) is *verifiable instruction tasks*: short instructions whose
one right answer is computed from the prompt itself, so later stages can measure correctness and a simulated labeler
can prefer correct answers. Words come from the list below (no downloads). The families:
  reverse        "Reverse the word: apple"        → "elppa"
  uppercase      "Uppercase: dog"                 → "DOG"
  add            "Add 3 and 4"                    → "7"        (numbers 0..20 when generated)
  repeat         "Repeat 'ha' 3 times"            → "hahaha"   (2..4 times)
  first_letter   "First letter of river"          → "r"
  count_words    "Count the words: red cat sun"   → "3"        (1..6 words)
`check(prompt, response)` is True when the response, stripped of surrounding whitespace, equals the family's answer
exactly (so "7." and "Elppa" are wrong); it recomputes the answer from the prompt, so it scores any prompt of a
family's form, generated or not, and raises for a prompt of no family.

Held-out prompts: a fixed hash of the prompt text (independent of the seed) puts about a fifth of all prompts
aside; `verifiable_demonstrations` draws training prompts only from the rest and test prompts only from them, so no
held-out prompt is ever a training prompt, whatever the sizes and seeds. Within a set, prompts are distinct; a family
whose distinct prompts run out stops contributing and the others fill the set (training prompts: reverse 92,
uppercase 86, first_letter 81, repeat 33, add 363; count_words has millions).
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from model.errors import InstructflowError
from model.text import split_of

FIELDS = ("prompt", "response")
SPLITS = ("train", "test")


@dataclass(frozen=True)
class Demonstration:
    prompt: str
    response: str
    family: str = ""  # the verifiable task family, or "" for a user's demonstration


@dataclass
class DemonstrationSet:
    name: str
    train: list[Demonstration] = field(default_factory=list)
    test: list[Demonstration] = field(default_factory=list)
    source: str = ""

    @property
    def sha256(self) -> str:
        """Of the rows and their splits, for cache keys."""
        rows = [[[d.prompt, d.response] for d in self.train], [[d.prompt, d.response] for d in self.test]]
        return hashlib.sha256(json.dumps(rows).encode()).hexdigest()


# --- a user's file ---------------------------------------------------------------------------------------


def load_demonstrations(path: str | Path, *, test_fraction: float = 0.1, seed: int = 0) -> DemonstrationSet:
    """A jsonl or parquet file of prompt/response rows (module docstring), split into train and test."""
    path = Path(path)
    if not path.is_file():
        raise InstructflowError(f"demonstration file {path} does not exist; give a jsonl or parquet file")
    if path.suffix == ".parquet":
        records = _parquet_records(path)
    elif path.suffix in (".jsonl", ".json"):
        records = _jsonl_records(path)
    else:
        raise InstructflowError(
            f"demonstration file {path}: use a .jsonl or .parquet file, not {path.suffix or 'a file without suffix'}"
        )
    if not records:
        raise InstructflowError(f"demonstration file {path} has no rows")
    with_split = [where for where, r in records if r.get("split") is not None]
    if with_split and len(with_split) != len(records):
        missing = next(where for where, r in records if r.get("split") is None)
        raise InstructflowError(
            f"demonstration file {path}, {missing}: no split, while other rows have one; give every row a split "
            f"({' or '.join(SPLITS)}) or none"
        )
    train, test = [], []
    for where, r in records:
        for name in FIELDS:
            if name not in r:
                raise InstructflowError(
                    f"demonstration file {path}, {where}: no field {name!r}; each row needs 'prompt' and 'response' "
                    f"(and optionally 'split'), this one has {sorted(r)}"
                )
            if not isinstance(r[name], str) or not r[name].strip():
                raise InstructflowError(f"demonstration file {path}, {where}: field {name!r} is empty or not text")
        if with_split:
            split = r["split"]
            if split not in SPLITS:
                raise InstructflowError(
                    f"demonstration file {path}, {where}: split {split!r} is not one of {', '.join(SPLITS)}"
                )
        else:
            split = "test" if split_of(r["prompt"], test_fraction, seed) == "val" else "train"
        (test if split == "test" else train).append(Demonstration(r["prompt"], r["response"]))
    for split, rows in (("train", train), ("test", test)):
        if not rows:
            raise InstructflowError(
                f"demonstration file {path}: the {split} split is empty ({len(train)} train, {len(test)} test rows); "
                f"add rows, give a 'split' field, or change test_fraction (now {test_fraction})"
            )
    return DemonstrationSet(path.stem, train, test, source=str(path))


def _jsonl_records(path: Path) -> list[tuple[str, dict]]:
    records = []
    for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as e:
            raise InstructflowError(f"demonstration file {path}, line {n}: not valid JSON ({e.msg})") from None
        if not isinstance(record, dict):
            raise InstructflowError(f"demonstration file {path}, line {n}: not a JSON object with prompt and response")
        records.append((f"line {n}", record))
    return records


def _parquet_records(path: Path) -> list[tuple[str, dict]]:
    import pandas as pd

    try:
        frame = pd.read_parquet(path)
    except Exception as e:  # pyarrow raises its own error types for files that are not parquet
        raise InstructflowError(f"demonstration file {path} is not valid parquet: {e}") from None
    frame = frame.astype(object).where(frame.notna(), None)  # missing values become None, not NaN
    return [(f"row {n}", r) for n, r in enumerate(frame.to_dict("records"), start=1)]


# --- the built-in verifiable tasks -----------------------------------------------------------------------

WORDS = (
    "apple", "river", "dog", "cat", "sun", "moon", "tree", "stone", "cloud", "bird", "fish", "house", "green",
    "water", "light", "night", "bread", "chair", "table", "music", "paper", "glass", "horse", "train", "plant",
    "smile", "ocean", "field", "storm", "dream", "candle", "garden", "window", "forest", "silver", "orange",
    "pencil", "rabbit", "winter", "summer", "island", "bridge", "castle", "rocket", "yellow", "purple", "mirror",
    "basket", "button", "dragon", "jungle", "planet", "spider", "tomato", "violin", "wallet", "anchor", "feather",
    "lemon", "mango", "tiger", "zebra", "eagle", "honey", "piano", "queen", "robot", "snake", "sugar", "tulip",
    "uncle", "valley", "whale", "yacht", "acorn", "bench", "coral", "daisy", "ember", "frost", "grape", "heart",
    "igloo", "jelly", "kite", "lamp", "maple", "nest", "olive", "pearl", "quilt", "red", "salt", "tent", "urn",
    "vase", "wind", "box", "yarn", "zoo", "ant", "bee", "cow", "hat",
)  # fmt: skip
UNITS = ("ha", "la", "na", "go", "ho", "yo", "ab", "xo", "ok", "hi", "do", "re")  # what "repeat" repeats
HELD_OUT_FRACTION = 0.2
HELD_OUT_SALT = 20220304  # InstructGPT's arXiv date; fixed, so the held-out prompts never depend on a run's seed


@dataclass(frozen=True)
class Family:
    """One kind of verifiable instruction: how to draw a prompt, how to recognise one, and its one right answer."""
    name: str
    pattern: re.Pattern  # matches exactly this family's prompts
    answer: Callable[[re.Match], str]  # the right response, computed from the prompt
    make: Callable[[np.random.Generator], str]  # a random prompt


def _word(rng: np.random.Generator) -> str:
    return WORDS[int(rng.integers(len(WORDS)))]


FAMILIES = (
    Family("reverse", re.compile(r"Reverse the word: (\S+)"), lambda m: m[1][::-1],
           lambda rng: f"Reverse the word: {_word(rng)}"),
    Family("uppercase", re.compile(r"Uppercase: (\S+)"), lambda m: m[1].upper(),
           lambda rng: f"Uppercase: {_word(rng)}"),
    Family("add", re.compile(r"Add (\d+) and (\d+)"), lambda m: str(int(m[1]) + int(m[2])),
           lambda rng: f"Add {int(rng.integers(21))} and {int(rng.integers(21))}"),
    Family("repeat", re.compile(r"Repeat '([^']+)' (\d+) times"), lambda m: m[1] * int(m[2]),
           lambda rng: f"Repeat '{UNITS[int(rng.integers(len(UNITS)))]}' {int(rng.integers(2, 5))} times"),
    Family("first_letter", re.compile(r"First letter of (\S+)"), lambda m: m[1][0],
           lambda rng: f"First letter of {_word(rng)}"),
    Family("count_words", re.compile(r"Count the words: (\S+(?: \S+)*)"), lambda m: str(len(m[1].split(" "))),
           lambda rng: "Count the words: " + " ".join(_word(rng) for _ in range(int(rng.integers(1, 7))))),
)
FAMILY_NAMES = tuple(f.name for f in FAMILIES)


def family_of(prompt: str) -> str | None:
    """The name of the family whose form `prompt` has, or None."""
    match = _match(prompt)
    return match[0].name if match else None


def reference_answer(prompt: str) -> str:
    """The one right response to a verifiable prompt."""
    match = _match(prompt)
    if match is None:
        raise InstructflowError(
            f"{prompt!r} is not a verifiable prompt; the checkable forms are e.g. 'Reverse the word: apple', "
            f"'Uppercase: dog', 'Add 3 and 4', \"Repeat 'ha' 3 times\", 'First letter of river', "
            f"'Count the words: a b c'"
        )
    family, m = match
    return family.answer(m)


def check(prompt: str, response: str) -> bool:
    """True when `response`, stripped of surrounding whitespace, is exactly the right answer to `prompt`."""
    return response.strip() == reference_answer(prompt)


def is_held_out(prompt: str) -> bool:
    """Whether a prompt is held out (about a fifth are, by a fixed hash of the text)."""
    return split_of(prompt, HELD_OUT_FRACTION, HELD_OUT_SALT) == "val"


def verifiable_demonstrations(n_train: int = 600, n_test: int = 60, seed: int = 0) -> DemonstrationSet:
    """The built-in set: n_train training and n_test held-out demonstrations, the families taking turns."""
    if n_train < 1 or n_test < 1:
        raise InstructflowError(
            f"the verifiable set needs at least one train and one test row, got n_train={n_train}, n_test={n_test}"
        )
    return DemonstrationSet(
        "verifiable",
        _draw(n_train, seed, held_out=False),
        _draw(n_test, seed, held_out=True),
        source=f"built-in verifiable instruction tasks, seed {seed}",
    )


def held_out_prompts(n: int, seed: int = 0) -> list[str]:
    """n distinct prompts that never occur among training prompts (for sampling and correctness evaluation)."""
    return [d.prompt for d in _draw(n, seed, held_out=True)]


def _match(prompt: str) -> tuple[Family, re.Match] | None:
    for family in FAMILIES:
        m = family.pattern.fullmatch(prompt)
        if m:
            return family, m
    return None


def _draw(n: int, seed: int, held_out: bool, tries: int = 200) -> list[Demonstration]:
    """n distinct prompts of the chosen side of the held-out hash, families in turn; a family is done when `tries`
    draws in a row find no new prompt for it."""
    rng = np.random.default_rng([seed, int(held_out)])
    live, seen, out = list(FAMILIES), set(), []
    while len(out) < n:
        if not live:
            raise InstructflowError(
                f"only {len(out)} distinct {'held-out' if held_out else 'training'} verifiable prompts exist; "
                f"ask for fewer than {n}"
            )
        family = live[len(out) % len(live)]
        for _ in range(tries):
            prompt = family.make(rng)
            if prompt not in seen and is_held_out(prompt) == held_out:
                seen.add(prompt)
                out.append(Demonstration(prompt, family.answer(family.pattern.fullmatch(prompt)), family.name))
                break
        else:
            live.remove(family)
    return out
