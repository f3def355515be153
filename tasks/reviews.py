"""The demo's feedback task: continue a movie review, judged by a hidden taste for favourable reviews.

Ziegler et al. 2019 ("Fine-Tuning Language Models from Human Preferences", §3.1) fine-tuned a language model to
continue movie reviews with positive sentiment, against a labeler simulated by a sentiment classifier: small
policies move quickly there, and the goal is one a person could hold ("I want to read the favourable take").
Here:
  prompt         "Continue the review: " + the first 4 words of a movie-review sentence (the `sentiment` task's
                 Pang & Lee sentences; training sentences for SFT, ranking and PPO, test sentences for judging)
  demonstration  the rest of that sentence, up to 20 more words (InstructGPT step 1's labeler demonstrations)
  gold           `sentiment_preference`: the logit of a logistic regression on which words a text uses, fitted on
                 the training sentences' positive/negative labels (held-out accuracy ~69%). It reads the
                 response only, so a response wins by being favourable, not by repeating the prompt. It stays
                 hidden: the reward model and PPO see only the rankings that come back through Label Studio.
The regression is fitted once per cache directory (a second or two) and stored as JSON beside the carriers.
"""

from __future__ import annotations

import json
import re
from functools import lru_cache

from model.errors import InstructflowError
from model.files import atomic_write
from tasks.settings import cache_dir

PREFIX = "Continue the review: "
PROMPT_WORDS = 4  # words of the sentence given in the prompt
MAX_WORDS = 24  # the demonstration ends after this many words of the sentence (prompt words included)
GOLD_L2 = 1e-3  # the regression's L2 penalty (summed squared weights), chosen by held-out accuracy
_WORD = re.compile(r"[a-z0-9']+")


def is_review_prompt(prompt: str) -> bool:
    return prompt.startswith(PREFIX)


def continuation(sentence: str) -> tuple[str, str] | None:
    """(prompt, demonstration) of one sentence, or None when it has too few words to continue."""
    words = sentence.split()
    if len(words) < PROMPT_WORDS + 3:
        return None
    return PREFIX + " ".join(words[:PROMPT_WORDS]), " ".join(words[PROMPT_WORDS:MAX_WORDS])


def _sentences(split: str) -> list[tuple[str, int]]:
    from tasks.labelled import load_task

    if split not in ("train", "test"):
        raise InstructflowError(f"the review sentences split is 'train' or 'test', not {split!r}")
    task = load_task("sentiment")
    return [(row.fields[0], row.label) for row in (task.train if split == "train" else task.test)]


def review_prompts(split: str, n: int, skip: int = 0) -> list[str]:
    """n distinct review prompts of a split (training sentences, or test sentences for judging, minus any opening a
    training sentence shares), after the first `skip`."""
    def openings(name: str) -> list[str]:
        return list(dict.fromkeys(p[0] for p in (continuation(s) for s, _ in _sentences(name)) if p))

    prompts = openings(split)
    if split == "test":  # two sentences can open alike: a judging prompt is never one trained on
        trained = set(openings("train"))
        prompts = [p for p in prompts if p not in trained]
    if skip + n > len(prompts):
        raise InstructflowError(f"only {max(0, len(prompts) - skip)} {split} review prompts exist after the first "
                                f"{skip}; ask for at most that many (n_prompts)")
    return prompts[skip:skip + n]


def review_demonstrations(n_train: int, n_test: int, seed: int = 0):
    """Demonstrations from the training sentences (one per opening): the first n_test after a seeded shuffle for
    validation, the next n_train for training. Test sentences are never used, so judging prompts stay unseen."""
    import random

    from tasks.demonstrations import Demonstration, DemonstrationSet

    pairs = list(dict(p for p in (continuation(s) for s, _ in _sentences("train")) if p).items())  # one per opening
    random.Random(f"reviews:{seed}").shuffle(pairs)
    if n_test + 1 > len(pairs):
        raise InstructflowError(f"only {len(pairs)} review demonstrations exist; ask for fewer than {n_test} held out")
    rows = [Demonstration(p, r, family="review") for p, r in pairs]
    return DemonstrationSet("reviews", train=rows[n_test:n_test + n_train], test=rows[:n_test],
                            source="sentiment task, training sentences")


# --- the gold preference -----------------------------------------------------------------------------------------


def words(text: str) -> set[str]:
    return set(_WORD.findall(text.lower()))


@lru_cache(maxsize=1)
def gold_weights() -> tuple[dict[str, float], float]:
    """(word -> weight, bias) of the sentiment regression, fitted on first use and cached as JSON."""
    path = cache_dir() / "gold" / "sentiment_preference.json"
    if path.is_file():
        data = json.loads(path.read_text())
        return data["weights"], data["bias"]
    weights, bias = fit_sentiment(_sentences("train"))
    atomic_write(path, json.dumps({"weights": weights, "bias": bias, "l2": GOLD_L2}, sort_keys=True).encode())
    return weights, bias


def fit_sentiment(rows: list[tuple[str, int]]) -> tuple[dict[str, float], float]:
    """L2-regularised logistic regression on binary word presence, full-batch L-BFGS (deterministic)."""
    import torch

    vocab: dict[str, int] = {}
    entries: list[tuple[int, int]] = []
    for i, (text, _) in enumerate(rows):
        for word in sorted(words(text)):
            entries.append((i, vocab.setdefault(word, len(vocab))))
    index = torch.tensor(entries, dtype=torch.long).T
    x = torch.sparse_coo_tensor(index, torch.ones(index.shape[1]), (len(rows), len(vocab)),
                                check_invariants=True).coalesce()
    y = torch.tensor([float(label) for _, label in rows])
    w = torch.zeros(len(vocab), 1, requires_grad=True)
    b = torch.zeros(1, requires_grad=True)
    optimizer = torch.optim.LBFGS([w, b], max_iter=200, line_search_fn="strong_wolfe")

    def closure() -> torch.Tensor:
        optimizer.zero_grad()
        logits = torch.sparse.mm(x, w).squeeze(1) + b
        loss = torch.nn.functional.binary_cross_entropy_with_logits(logits, y) + GOLD_L2 * (w ** 2).sum()
        loss.backward()
        return loss

    optimizer.step(closure)
    weights = w.detach().squeeze(1).tolist()
    return {word: weights[i] for word, i in vocab.items()}, float(b.detach())


def sentiment_preference(prompt: str, response: str) -> float:
    """The gold score of a continuation: the regression's logit that the response's words are favourable."""
    weights, bias = gold_weights()
    return bias + sum(weights.get(word, 0.0) for word in words(response))
