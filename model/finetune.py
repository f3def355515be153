"""GPT-1 supervised fine-tuning (Radford et al. 2018, §3.2–3.3): input transformations, task head, L3 loss, loop.

Every task becomes one or more token sequences that end in the extract token; a linear layer reads the final
hidden state at that token (Figure 1):
  classification   [start] text [extract]
  entailment       [start] premise [delim] hypothesis [extract]
  similarity       [start] a [delim] b [extract]  and  [start] b [delim] a [extract]; the two states are added
  multiple_choice  [start] context [delim] option_k [extract] for each k; one score each, softmax over options
The objective is L3 = L2 + λ·L1 (eq. 5): the task's cross-entropy plus λ times the language-model loss on the
same inputs (λ = 0.5 in the paper; 0 turns the auxiliary objective off).
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from model.checkpoint import load_extra
from model.config import GPTConfig
from model.errors import InstructflowError
from model.files import atomic_directory
from model.gpt import GPT
from model.train import lr_at, make_optimizer  # AdamW, decay on matrices only

KINDS = ("classification", "entailment", "similarity", "multiple_choice")
FIELDS_PER_KIND = {"classification": 1, "entailment": 2, "similarity": 2, "multiple_choice": 1}
SPECIAL_NAMES = ("<|start|>", "<|delim|>", "<|extract|>")


@dataclass(frozen=True)
class Specials:
    start: int
    delim: int
    extract: int


@dataclass
class Example:
    """One labelled example as token sequences (1 for classification/entailment, 2 for similarity, K for choice)."""
    sequences: list[list[int]]
    label: int
    truncated: bool = False


def cap_lengths(lengths: Sequence[int], budget: int) -> list[int]:
    """New lengths summing to at most `budget`: the longest fields are cut first, to one common cap."""
    if sum(lengths) <= budget:
        return list(lengths)
    cap = 0
    while sum(min(n, cap + 1) for n in lengths) <= budget:  # at most max(lengths) iterations
        cap += 1
    return [min(n, cap) for n in lengths]


def transform(kind: str, fields: Sequence[list[int]], specials: Specials, max_len: int,
              options: Sequence[list[int]] = ()) -> tuple[list[list[int]], bool]:
    """The input transformation of `kind` (Figure 1), truncated to max_len; returns (sequences, truncated).

    Too long an input is truncated rather than refused: a long review is still worth classifying on its
    first few hundred tokens, and refusing would stop a whole run on one example. Fields are cut to a common
    cap (longest first); the first field loses its beginning (the end sits next to the delimiter and, for
    multiple choice, holds the question), the others their ends. Options are never cut: an example whose
    longest option alone does not fit raises, since no truncation keeps it answerable.
    """
    if kind not in KINDS:
        raise InstructflowError(f"unknown task kind {kind!r}; use one of {', '.join(KINDS)}")
    if len(fields) != FIELDS_PER_KIND[kind]:
        raise InstructflowError(f"a {kind} example needs {FIELDS_PER_KIND[kind]} text field(s), got {len(fields)}")
    if kind == "multiple_choice" and len(options) < 2:
        raise InstructflowError(f"a multiple_choice example needs at least 2 options, got {len(options)}")
    s, d, e = specials.start, specials.delim, specials.extract
    fixed = 2 + (len(fields) - 1)  # start + extract + one delimiter between fields
    if kind == "multiple_choice":
        fixed += 1 + max(len(o) for o in options)  # delimiter + the option
    budget = max_len - fixed
    if budget < len(fields):
        raise InstructflowError(
            f"a {kind} example does not fit the context of {max_len} tokens even with its text cut to one token"
            + (" (its longest option is too long)" if kind == "multiple_choice" else "")
        )
    caps = cap_lengths([len(f) for f in fields], budget)
    cut = [f[len(f) - c:] if i == 0 else f[:c] for i, (f, c) in enumerate(zip(fields, caps))]
    truncated = caps != [len(f) for f in fields]
    if kind == "classification":
        return [[s, *cut[0], e]], truncated
    if kind == "entailment":
        return [[s, *cut[0], d, *cut[1], e]], truncated
    if kind == "similarity":  # no inherent order between the two texts: both orders, representations added
        return [[s, *cut[0], d, *cut[1], e], [s, *cut[1], d, *cut[0], e]], truncated
    return [[s, *cut[0], d, *option, e] for option in options], truncated


@dataclass
class Batch:
    """Sequences of several examples, right-padded: ids (N, T); `example` maps each sequence to its example."""
    ids: torch.Tensor  # (N, T) long
    lengths: torch.Tensor  # (N,) real tokens per sequence; the extract token sits at lengths - 1
    example: torch.Tensor  # (N,) index of the example the sequence belongs to
    labels: torch.Tensor  # (E,)
    n_options: list[int]  # sequences per example

    def to(self, device) -> Batch:
        return Batch(self.ids.to(device), self.lengths.to(device), self.example.to(device), self.labels.to(device),
                     self.n_options)


def collate(examples: Sequence[Example], pad: int) -> Batch:
    """Right padding needs no attention mask: a causal model's real tokens never look at later padding."""
    sequences = [s for ex in examples for s in ex.sequences]
    T = max(len(s) for s in sequences)
    ids = torch.full((len(sequences), T), pad, dtype=torch.long)
    for i, s in enumerate(sequences):
        ids[i, :len(s)] = torch.tensor(s)
    return Batch(
        ids=ids,
        lengths=torch.tensor([len(s) for s in sequences]),
        example=torch.tensor([i for i, ex in enumerate(examples) for _ in ex.sequences]),
        labels=torch.tensor([ex.label for ex in examples]),
        n_options=[len(ex.sequences) for ex in examples],
    )


class TaskModel(nn.Module):
    """A GPT with GPT-1's task head: a linear layer W_y on the extract token's final hidden state."""

    def __init__(self, gpt: GPT, kind: str, n_classes: int, head_dropout: float = 0.1) -> None:
        super().__init__()
        if kind not in KINDS:
            raise InstructflowError(f"unknown task kind {kind!r}; use one of {', '.join(KINDS)}")
        if kind != "multiple_choice" and n_classes < 2:
            raise InstructflowError(f"a {kind} task needs at least 2 classes, got {n_classes}")
        self.gpt, self.kind = gpt, kind
        self.dropout = nn.Dropout(head_dropout)  # GPT-1 §4.1: "dropout to the classifier with a rate of 0.1"
        self.head = nn.Linear(gpt.config.n_embd, 1 if kind == "multiple_choice" else n_classes)
        nn.init.normal_(self.head.weight, std=gpt.config.init_std)
        nn.init.zeros_(self.head.bias)

    def forward(self, batch: Batch, lm_loss: bool = True) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Task logits (E, classes or max options; missing options are -inf) and the LM loss on the inputs."""
        h = self.gpt.hidden_states(batch.ids)  # (N, T, C)
        rows = torch.arange(h.size(0), device=h.device)
        extract = self.dropout(h[rows, batch.lengths - 1])  # (N, C): the state at each extract token
        E = len(batch.n_options)
        if self.kind == "multiple_choice":
            scores = self.head(extract).squeeze(-1)  # (N,): one score per option
            logits = scores.new_full((E, max(batch.n_options)), float("-inf"))
            position = torch.cat([torch.arange(n, device=h.device) for n in batch.n_options])
            logits[batch.example, position] = scores
        else:  # similarity sums the two orders' states; the others have one sequence per example
            summed = extract.new_zeros(E, extract.size(-1)).index_add_(0, batch.example, extract)
            logits = self.head(summed)
        lm = None
        if lm_loss:
            targets = batch.ids[:, 1:].clone()
            real = torch.arange(1, batch.ids.size(1), device=h.device).view(1, -1) < batch.lengths.view(-1, 1)
            targets[~real] = -100  # no loss on padding
            vocab_logits = self.gpt.lm_head(h[:, :-1])
            lm = F.cross_entropy(vocab_logits.reshape(-1, vocab_logits.size(-1)).float(), targets.reshape(-1),
                                 ignore_index=-100)
        return logits, lm


def l3_loss(logits: torch.Tensor, labels: torch.Tensor, lm_loss: torch.Tensor | None,
            lm_weight: float) -> tuple[torch.Tensor, dict[str, float]]:
    """L3 = L2 + λ·L1 (GPT-1 eq. 5): task cross-entropy plus λ times the auxiliary language-model loss."""
    task = F.cross_entropy(logits.float(), labels)
    total = task if lm_loss is None or lm_weight == 0 else task + lm_weight * lm_loss
    parts = {"task_loss": task.item(), "loss": total.item()}
    if lm_loss is not None:
        parts["lm_loss"] = lm_loss.item()
    return total, parts


def transfer_layers(source: GPT, target: GPT, n_layers: int) -> None:
    """Copy the embeddings and the first n_layers blocks of `source` into `target` (GPT-1 Figure 2, left).

    The final LayerNorm comes along only when every block does: it normalises the last block's output.
    """
    if source.config.n_embd != target.config.n_embd or source.config.vocab_size != target.config.vocab_size:
        raise InstructflowError("layers can only be transferred between models of the same width and vocabulary")
    if not 0 <= n_layers <= min(source.config.n_layer, target.config.n_layer):
        raise InstructflowError(f"n_layers={n_layers} is outside 0..{source.config.n_layer}")
    with torch.no_grad():
        target.wte.weight.copy_(source.wte.weight)
        n_pos = min(source.config.block_size, target.config.block_size)
        target.wpe.weight[:n_pos].copy_(source.wpe.weight[:n_pos])
        for i in range(n_layers):
            target.blocks[i].load_state_dict(source.blocks[i].state_dict())
        if n_layers == source.config.n_layer == target.config.n_layer:
            target.ln_f.load_state_dict(source.ln_f.state_dict())


@dataclass
class FinetuneConfig:
    """GPT-1 §4.1 fine-tuning defaults: lr 6.25e-5, batch 32, 3 epochs, warmup over 0.2% then linear decay, λ 0.5."""
    learning_rate: float = 6.25e-5
    batch_size: int = 32  # examples per step (all workers together)
    epochs: int = 3
    warmup_fraction: float = 0.002
    lm_weight: float = 0.5  # λ in L3 = L2 + λ·L1
    weight_decay: float = 0.01  # GPT-1's modified L2 regularisation, w = 0.01
    betas: tuple[float, float] = (0.9, 0.999)  # GPT-1 used Adam's defaults
    grad_clip: float | None = 1.0
    eval_every: int = 50  # steps between held-out evaluations (and always at the end)
    log_every: int = 10
    seed: int = 0

    def warmup_steps(self, total_steps: int) -> int:
        """warmup_fraction of the run's steps, at least one (then the rate decays linearly to 0 at the last)."""
        return max(1, math.ceil(self.warmup_fraction * total_steps))


def steps_per_epoch(n_examples: int, cfg: FinetuneConfig) -> int:
    return math.ceil(n_examples / cfg.batch_size)


def epoch_order(n_examples: int, epoch: int, seed: int) -> np.ndarray:
    """The example order of one epoch, fixed by (seed, epoch): a resumed run sees the same batches."""
    return np.random.default_rng([seed, epoch]).permutation(n_examples)


@torch.no_grad()
def predict(model: TaskModel, examples: Sequence[Example], pad: int, batch_size: int = 64) -> np.ndarray:
    """The predicted label (class, or option index) of each example; batches are formed in order of length (less
    padding), the predictions come back in the given order."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    order = sorted(range(len(examples)), key=lambda i: max(len(s) for s in examples[i].sequences))
    predicted = np.zeros(len(examples), dtype=np.int64)
    for i in range(0, len(order), batch_size):
        rows = order[i:i + batch_size]
        logits, _ = model(collate([examples[r] for r in rows], pad).to(device), lm_loss=False)
        predicted[rows] = logits.argmax(-1).cpu().numpy()
    model.train(was_training)
    return predicted


def classification_metrics(predicted: np.ndarray, gold: np.ndarray, n_classes: int) -> dict[str, float]:
    """Accuracy and macro-F1 (the unweighted mean of per-class F1, so a rare class counts as much as a common one)."""
    if len(gold) == 0:
        raise InstructflowError("cannot score an empty split")
    f1s = []
    for c in range(n_classes):
        tp = np.sum((predicted == c) & (gold == c))
        fp = np.sum((predicted == c) & (gold != c))
        fn = np.sum((predicted != c) & (gold == c))
        f1s.append(0.0 if tp == 0 else 2 * tp / (2 * tp + fp + fn))
    return {"accuracy": float(np.mean(predicted == gold)), "macro_f1": float(np.mean(f1s))}


@dataclass
class FinetuneState:
    step: int = 0
    history: list[dict] = field(default_factory=list)


def finetune(
    model: TaskModel,
    train_examples: Sequence[Example],
    val_examples: Sequence[Example],
    cfg: FinetuneConfig,
    *,
    pad: int,
    n_classes: int,
    log: Callable[[dict, int], None] = lambda metrics, step: None,
    state: FinetuneState | None = None,
    optimizer: torch.optim.Optimizer | None = None,
    on_step_end: Callable[[FinetuneState], None] | None = None,
    rank: int = 0,
    world_size: int = 1,
) -> FinetuneState:
    """Fine-tune for cfg.epochs with L3; metrics (loss, task_loss, lm_loss, val accuracy/macro_f1) go to `log`.

    Each step takes cfg.batch_size examples; worker `rank` of `world_size` computes its slice of them.
    """
    if not train_examples:
        raise InstructflowError("the training split is empty: nothing to fine-tune on")
    if not val_examples:
        raise InstructflowError("the held-out split is empty: fine-tuning could not be scored")
    core = getattr(model, "module", model)
    device = next(model.parameters()).device
    state = state or FinetuneState()
    optimizer = optimizer or make_optimizer(model, cfg)
    per_epoch = steps_per_epoch(len(train_examples), cfg)
    total = per_epoch * cfg.epochs
    gold = np.array([ex.label for ex in val_examples])
    model.train()
    window, logged_step = time.perf_counter(), state.step
    while state.step < total:
        epoch, position = divmod(state.step, per_epoch)
        order = epoch_order(len(train_examples), epoch, cfg.seed)
        chosen = order[position * cfg.batch_size:(position + 1) * cfg.batch_size][rank::world_size]
        lr = lr_at(state.step, cfg.learning_rate, warmup_steps=cfg.warmup_steps(total),
                   decay="linear", total_steps=total)
        for group in optimizer.param_groups:
            group["lr"] = lr
        batch = collate([train_examples[i] for i in chosen], pad).to(device)
        logits, lm = model(batch, lm_loss=cfg.lm_weight > 0)
        loss, parts = l3_loss(logits, batch.labels, lm, cfg.lm_weight)
        if not math.isfinite(parts["loss"]):
            raise FloatingPointError(f"fine-tuning loss became {parts['loss']} at step {state.step}; lower the learning rate")
        loss.backward()
        grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip or float("inf"))
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        state.step += 1
        last = state.step == total
        scoring = state.step % cfg.eval_every == 0 or last
        if state.step % cfg.log_every == 0 or state.step == 1 or scoring:
            metrics = {**parts, "lr": lr, "grad_norm": float(grad_norm), "epoch": epoch,
                       "steps_per_s": (state.step - logged_step) / (time.perf_counter() - window)}
            if scoring:
                scored = classification_metrics(predict(core, val_examples, pad), gold, n_classes)
                metrics.update({f"val_{k}": v for k, v in scored.items()})
            state.history.append({"step": state.step, **metrics})
            log(metrics, state.step)
            window, logged_step = time.perf_counter(), state.step
        if on_step_end is not None:
            on_step_end(state)
    return state


def save_task_model(model: TaskModel, directory, labels: Sequence[str] = (), extra: dict | None = None):
    """model.pt (GPT + head weights), config.json (the GPT's config) and task.json (kind, classes, labels)."""
    directory = Path(directory)
    with atomic_directory(directory) as staging:
        torch.save(model.state_dict(), staging / "model.pt")
        (staging / "config.json").write_text(json.dumps(model.gpt.config.to_dict(), indent=2))
        task = {"kind": model.kind, "n_outputs": model.head.out_features, "labels": list(labels)}
        (staging / "task.json").write_text(json.dumps(task, indent=2))
        if extra is not None:
            torch.save(extra, staging / "extra.pt")
    return directory


def load_task_model(directory, device="cpu") -> tuple[TaskModel, dict, dict | None]:
    """The TaskModel saved by save_task_model, its task.json and its extra state (None if none)."""
    directory = Path(directory)
    if not (directory / "task.json").is_file():
        raise InstructflowError(f"{directory} is not a fine-tuned checkpoint: it has no task.json")
    task = json.loads((directory / "task.json").read_text())
    gpt = GPT(GPTConfig.from_dict(json.loads((directory / "config.json").read_text())))
    n_classes = task["n_outputs"] if task["kind"] != "multiple_choice" else 2
    model = TaskModel(gpt, task["kind"], n_classes)
    model.load_state_dict(torch.load(directory / "model.pt", map_location=device, weights_only=True))
    return model.to(device), task, load_extra(directory / "extra.pt", device)
