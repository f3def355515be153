"""InstructGPT step 1, supervised fine-tuning (Ouyang et al. 2022, §3.5, Appendix C.1): chat rendering, packing, loop.

A demonstration (a prompt and the labeler's response) is rendered with the tokenizer's chat tokens:
  [eot] ([system] system [end]) [user] prompt [end] [assistant] response [end]
The loss is the causal-LM cross-entropy on the response tokens and the closing [end] only: the model learns to
answer and to stop, never to imitate the prompt. A prompt-only rendering (for sampling) ends right after
[assistant]. The leading <|endoftext|> is where every pretraining document starts (each document is followed by
it), and it delimits demonstrations packed into one row.

Packing (GPT-3 Appendix B: "documents within a sequence are delimited with a special end of text token ... without
need for any special sequence-specific masking"): whole rendered examples are concatenated, in an order shuffled by
a seed, into rows of seq_len + 1 tokens (inputs are the first seq_len, targets the last seq_len); an example that
does not fit the current row starts the next one (next-fit), and the rest of a row is padding with target -100.
  - An example is never split across rows: the second half of a response, cut off from its prompt, would teach the
    model to answer without a question.
  - Attention crosses example boundaries inside a row, as in GPT-3's pretraining; positions keep counting. Every
    example is preceded by <|endoftext|> both in training and at sampling time, which tells the model that what
    came before is unrelated. (Separate attention per example would need a block-diagonal mask GPT.forward does
    not take.) Training packs the examples anew every epoch (EpochPlan), so no example keeps one position or one
    neighbour: a tiny model trained on a fixed packing answered prompts that sat mid-row wrongly when sampled alone.
  - An example longer than a row loses the end of its response (and so its closing [end]) and is counted in
    `Packed.truncated`: one long answer should not stop a run, and its beginning is still a good demonstration.
    An example whose prompt leaves no room for even one response token is refused: no cut keeps it useful.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from contextlib import nullcontext
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F

from model.errors import InstructflowError
from model.generate import generate
from model.gpt import GPT
from model.tokenizer import Tokenizer
from model.train import lr_at, make_optimizer

CHAT_NAMES = ("<|system|>", "<|user|>", "<|assistant|>", "<|end|>")
IGNORE = -100  # the target of a position without loss (F.cross_entropy's ignore_index)


# --- rendering -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class ChatTokens:
    eot: int
    system: int
    user: int
    assistant: int
    end: int


def chat_tokens(tokenizer: Tokenizer) -> ChatTokens:
    """The ids of the chat special tokens; a tokenizer without them (GPT-2's encoding) is refused."""
    missing = [n for n in CHAT_NAMES if n not in tokenizer.specials]
    if missing:
        raise InstructflowError(
            f"the tokenizer has no {', '.join(missing)} token(s), which chat rendering needs (GPT-2's encoding "
            f"has only <|endoftext|>); use a tokenizer trained by the pipeline (Tokenizer.train reserves them)"
        )
    return ChatTokens(tokenizer.eot_id, *(tokenizer.special_id(n) for n in CHAT_NAMES))


@dataclass(frozen=True)
class Rendered:
    """One rendered conversation: token ids and the loss mask (1 = a response token the loss is computed on)."""
    ids: list[int]
    mask: list[int]

    @property
    def prompt_len(self) -> int:
        """Tokens before the response (all of them for a prompt-only rendering)."""
        return self.mask.index(1) if 1 in self.mask else len(self.mask)


def render(tokenizer: Tokenizer, prompt: str, response: str | None = None, *, system: str | None = None) -> Rendered:
    """[eot] ([system] system [end]) [user] prompt [end] [assistant] (response [end]); loss on the response part.

    Text is encoded without special tokens: a prompt that contains "<|end|>" cannot close its own turn.
    """
    for name, text in (("prompt", prompt), ("response", response), ("system", system)):
        if text is not None and not isinstance(text, str):
            raise InstructflowError(f"the {name} must be text (str), got {type(text).__name__}")
    chat = chat_tokens(tokenizer)
    ids = [chat.eot]
    if system is not None:
        ids += [chat.system, *tokenizer.encode(system), chat.end]
    ids += [chat.user, *tokenizer.encode(prompt), chat.end, chat.assistant]
    mask = [0] * len(ids)
    if response is not None:
        answer = [*tokenizer.encode(response), chat.end]  # the closing [end] is learned too: it is how to stop
        ids += answer
        mask += [1] * len(answer)
    return Rendered(ids, mask)


# --- packing -------------------------------------------------------------------------------------


@dataclass
class Packed:
    """Rendered examples packed into rows: inputs and next-token targets (N, seq_len), -100 where there is no loss."""
    inputs: torch.Tensor  # (N, seq_len) long
    targets: torch.Tensor  # (N, seq_len) long: the next token where it is a response token, else -100
    rows: list[list[int]]  # the examples of each row, in order (indices into the list given to `pack`)
    truncated: int = 0  # examples whose response was cut to fit a row
    tokens: int = 0  # example tokens in all rows (the rest is padding)

    def __len__(self) -> int:
        return self.inputs.size(0)

    @property
    def response_tokens(self) -> int:
        return int((self.targets != IGNORE).sum())

    @property
    def fill(self) -> float:
        """Share of the rows' seq_len + 1 token slots holding example tokens rather than padding."""
        return self.tokens / (len(self) * (self.inputs.size(1) + 1))


def fit_examples(examples: Sequence[Rendered], seq_len: int) -> tuple[list[Rendered], int]:
    """Examples cut to one row of seq_len + 1 tokens (the response loses its end), and how many were cut."""
    if not examples:
        raise InstructflowError("no examples to pack: the demonstration split is empty")
    if seq_len < 2:
        raise InstructflowError(f"seq_len must be at least 2, got {seq_len}")
    capacity = seq_len + 1  # seq_len inputs predict seq_len targets: a row holds seq_len + 1 tokens
    fitted, truncated = [], 0
    for n, ex in enumerate(examples):
        if len(ex.ids) > capacity:
            if ex.prompt_len + 1 > capacity:
                raise InstructflowError(
                    f"example {n}: its prompt takes {ex.prompt_len} tokens, leaving no room for a response in rows of "
                    f"seq_len={seq_len}; raise seq_len or shorten the prompt"
                )
            ex = Rendered(ex.ids[:capacity], ex.mask[:capacity])
            truncated += 1
        fitted.append(ex)
    return fitted, truncated


def layout(lengths: Sequence[int], capacity: int, seed: int | Sequence[int]) -> list[list[int]]:
    """Example indices per row: the examples in an order shuffled by `seed`, next-fit into rows of `capacity` tokens."""
    rows: list[list[int]] = [[]]
    used = 0
    for i in np.random.default_rng(seed).permutation(len(lengths)).tolist():
        if used + lengths[i] > capacity:  # next-fit: this example opens a new row
            rows.append([])
            used = 0
        rows[-1].append(i)
        used += lengths[i]
    return rows


def row_tensors(fitted: Sequence[Rendered], rows: list[list[int]], seq_len: int, pad: int) -> Packed:
    """The (inputs, targets) of rows laid out by `layout`; the end of each row is padding without loss."""
    inputs = torch.full((len(rows), seq_len), pad, dtype=torch.long)
    targets = torch.full((len(rows), seq_len), IGNORE, dtype=torch.long)
    tokens = 0
    for r, members in enumerate(rows):
        ids = torch.tensor([t for i in members for t in fitted[i].ids], dtype=torch.long)
        mask = torch.tensor([m for i in members for m in fitted[i].mask], dtype=torch.bool)
        n = ids.numel()
        inputs[r, :min(n, seq_len)] = ids[:seq_len]
        targets[r, :n - 1] = ids[1:].masked_fill(~mask[1:], IGNORE)  # position t predicts token t + 1
        tokens += n
    return Packed(inputs, targets, rows, tokens=tokens)


def pack(examples: Sequence[Rendered], seq_len: int, *, pad: int, seed: int | Sequence[int] = 0) -> Packed:
    """Whole examples, in an order shuffled by `seed`, next-fit into rows of seq_len + 1 tokens (module docstring)."""
    fitted, truncated = fit_examples(examples, seq_len)
    packed = row_tensors(fitted, layout([len(e.ids) for e in fitted], seq_len + 1, seed), seq_len, pad)
    packed.truncated = truncated
    return packed


# --- the loop ------------------------------------------------------------------------------------


@dataclass
class SFTConfig:
    """InstructGPT's SFT recipe (Appendix C.1) with the epochs scaled down for small models and demonstration sets.

    C.1: "16 epochs with residual dropout of 0.2", "a cosine LR schedule down to 10% of the original learning rate,
    with no learning rate warmup"; LR 9.65e-6 and batch 32 for 1.3B and 6B, LR 5.03e-6 and batch 8 for 175B. The
    paper chose its final models by reward-model score (SFT overfits validation loss after one epoch, §3.5); with no
    reward model yet at this stage, `sft` tracks the step with the lowest validation loss.
    """
    learning_rate: float = 9.65e-6  # C.1, 1.3B/6B; tiny models trained from scratch want ~1e-3
    batch_size: int = 32  # packed rows per step, all workers together (C.1: 32 for 1.3B/6B)
    seq_len: int = 256  # tokens per row; at most the model's block_size
    epochs: int = 2  # C.1 trains 16; a small model on a small set overfits long before that
    min_lr_ratio: float = 0.1  # C.1: cosine decay to 10% of the peak
    warmup_steps: int = 0  # C.1: no warmup
    residual_dropout: float | None = 0.2  # C.1; on the attention and MLP outputs; None keeps the model's own
    weight_decay: float = 0.1  # not reported for SFT: GPT-3 Appendix B's value for the pretrained model
    betas: tuple[float, float] = (0.9, 0.95)  # GPT-3 Appendix B
    grad_clip: float | None = 1.0  # GPT-3 Appendix B
    eval_every: int = 50  # steps between validation losses (also before the first step and after the last)
    eval_batch_size: int = 32
    log_every: int = 10
    seed: int = 0  # the packing of each epoch, and of the validation rows

    def __post_init__(self) -> None:
        for name in ("batch_size", "epochs", "eval_every", "eval_batch_size", "log_every"):
            if getattr(self, name) < 1:
                raise InstructflowError(f"SFTConfig.{name} must be at least 1, got {getattr(self, name)}")
        if self.seq_len < 2:
            raise InstructflowError(f"SFTConfig.seq_len must be at least 2, got {self.seq_len}")
        if self.residual_dropout is not None and not 0 <= self.residual_dropout < 1:
            raise InstructflowError(f"SFTConfig.residual_dropout must be in [0, 1), got {self.residual_dropout}")


class EpochPlan:
    """Which rows each step trains on: every epoch packs the training examples anew, shuffled by (seed, epoch).

    Repacking moves each example to new row-mates and offsets every epoch, so the model cannot lean on where an
    example sat (it is sampled alone, right after <|endoftext|>). A step takes batch_size consecutive rows of its
    epoch; the last batch of an epoch is completed from the epoch's first rows (as torch's DistributedSampler pads),
    so every step has exactly batch_size rows and every worker batch_size / world_size. Only the row layouts of all
    epochs are computed up front (for the schedule's length); an epoch's tensors are built when it starts.
    """

    def __init__(self, examples: Sequence[Rendered], cfg: SFTConfig, pad: int) -> None:
        self.fitted, self.truncated = fit_examples(examples, cfg.seq_len)
        self.cfg, self.pad = cfg, pad
        lengths = [len(e.ids) for e in self.fitted]
        self.layouts = [layout(lengths, cfg.seq_len + 1, [cfg.seed, epoch]) for epoch in range(cfg.epochs)]
        steps = [math.ceil(len(rows) / cfg.batch_size) for rows in self.layouts]
        self.starts = np.cumsum([0, *steps])  # the first step of each epoch, then the total
        self._built: tuple[int, Packed] | None = None

    @property
    def total_steps(self) -> int:
        return int(self.starts[-1])

    def epoch_of(self, step: int) -> int:
        return int(np.searchsorted(self.starts, step, side="right") - 1)

    def rows(self, epoch: int) -> Packed:
        if self._built is None or self._built[0] != epoch:
            self._built = (epoch, row_tensors(self.fitted, self.layouts[epoch], self.cfg.seq_len, self.pad))
        return self._built[1]

    def batch(self, step: int, rank: int = 0, world_size: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
        """This worker's (inputs, targets) at `step`, each (batch_size / world_size, seq_len)."""
        epoch = self.epoch_of(step)
        rows = self.rows(epoch)
        position = step - int(self.starts[epoch])
        chosen = np.arange(position * self.cfg.batch_size, (position + 1) * self.cfg.batch_size) % len(rows)
        chosen = torch.from_numpy(chosen[rank::world_size])
        return rows.inputs[chosen], rows.targets[chosen]


@torch.no_grad()
def response_loss(model: GPT, rows: Packed, batch_size: int = 32, autocast=None) -> float:
    """Mean cross-entropy per response token over all rows (each token counts once, whatever its row)."""
    autocast = autocast or nullcontext
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    total, count = 0.0, 0
    for i in range(0, len(rows), batch_size):
        x, y = rows.inputs[i:i + batch_size].to(device), rows.targets[i:i + batch_size].to(device)
        with autocast():
            logits, _ = model(x)  # (B, T, vocab)
        total += F.cross_entropy(logits.flatten(0, 1).float(), y.flatten(), ignore_index=IGNORE, reduction="sum").item()
        count += int((y != IGNORE).sum())
    model.train(was_training)
    return total / count


def _residual_dropouts(model: GPT) -> list[torch.nn.Dropout]:
    """The dropout on every block's attention and MLP outputs (GPT-2's resid_pdrop; InstructGPT's residual dropout)."""
    return [m for block in model.blocks for m in (block.attn.resid_dropout, block.mlp.dropout)]


@dataclass
class SFTState:
    step: int = 0  # optimiser steps done
    best_val_loss: float = math.inf
    best_step: int | None = None  # the step whose weights had best_val_loss; 0 = the model before SFT
    truncated: int = 0  # training examples whose response was cut to fit a row
    history: list[dict] = field(default_factory=list)  # every logged metrics dict, with its step


def sft(
    model: GPT,
    train_examples: Sequence[Rendered],
    val_examples: Sequence[Rendered],
    cfg: SFTConfig,
    *,
    pad: int,
    log: Callable[[dict, int], None] = lambda metrics, step: None,
    state: SFTState | None = None,
    optimizer: torch.optim.Optimizer | None = None,
    on_step_end: Callable[[SFTState], None] | None = None,
    autocast=None,
    rank: int = 0,
    world_size: int = 1,
) -> SFTState:
    """Fine-tune on rendered demonstrations for cfg.epochs (packed anew each epoch, see EpochPlan).

    `log(metrics, step)` gets loss (mean over this worker's response tokens), lr, grad_norm, epoch, tokens_per_s and,
    at evaluations, val_loss and best_val_loss. The validation loss (mean over response tokens of the validation
    examples, packed once with cfg.seed) is measured before the first step (logged at step 0), every cfg.eval_every
    steps and after the last; state.best_step and state.best_val_loss follow its minimum. `on_step_end` runs after
    every step: a checkpoint hook that keeps the best weights saves them when state.best_step == state.step.
    `pad` is the input id of padding (it gets no loss; the tokenizer's <|endoftext|> is natural). cfg.residual_dropout
    is set on the model for the run and restored after. Worker `rank` of `world_size` computes its share of each
    step's rows (the model may be DDP-wrapped); `autocast` is the caller's context factory (bf16 on GPU).
    """
    if not train_examples:
        raise InstructflowError("the training split is empty: nothing to fine-tune on")
    if not val_examples:
        raise InstructflowError("the held-out split is empty: SFT checkpoints are chosen by validation loss")
    if cfg.batch_size % world_size:
        raise InstructflowError(
            f"SFTConfig.batch_size={cfg.batch_size} does not divide among {world_size} workers; "
            f"use a multiple of {world_size}"
        )
    autocast = autocast or nullcontext
    core = getattr(model, "module", model)  # under DDP the GPT is model.module
    if cfg.seq_len > core.config.block_size:
        raise InstructflowError(
            f"SFTConfig.seq_len={cfg.seq_len} is longer than the model's context of {core.config.block_size}; lower it"
        )
    device = next(model.parameters()).device
    plan = EpochPlan(train_examples, cfg, pad)
    val_rows = pack(val_examples, cfg.seq_len, pad=pad, seed=cfg.seed)
    state = state or SFTState()
    state.truncated = plan.truncated
    optimizer = optimizer or make_optimizer(model, cfg)  # model/train.py's AdamW: decay on matrices only
    step_tokens = cfg.batch_size * cfg.seq_len  # all workers together

    def validate(step: int) -> dict:
        val_loss = response_loss(core, val_rows, cfg.eval_batch_size, autocast)
        if val_loss < state.best_val_loss:
            state.best_val_loss, state.best_step = val_loss, step
        return {"val_loss": val_loss, "best_val_loss": state.best_val_loss}

    dropouts = _residual_dropouts(core)
    old_rates = [m.p for m in dropouts]
    if cfg.residual_dropout is not None:
        for m in dropouts:
            m.p = cfg.residual_dropout
    try:
        if state.step == 0 and state.best_step is None:  # the baseline: is the fine-tuned model any better?
            metrics = validate(0)
            state.history.append({"step": 0, **metrics})
            log(metrics, 0)
        model.train()
        window_tokens, window_start = 0, time.perf_counter()
        while state.step < plan.total_steps:
            # 1. this step's rows and learning rate
            epoch = plan.epoch_of(state.step)
            x, y = plan.batch(state.step, rank, world_size)
            lr = lr_at(state.step, cfg.learning_rate, warmup_steps=cfg.warmup_steps, total_steps=plan.total_steps,
                       min_ratio=cfg.min_lr_ratio)
            for group in optimizer.param_groups:
                group["lr"] = lr
            # 2. the loss on response tokens only (prompt and padding targets are -100)
            with autocast():
                _, loss = model(x.to(device), y.to(device))
            if not math.isfinite(loss.item()):
                raise FloatingPointError(f"SFT loss became {loss.item()} at step {state.step}; lower the learning rate")
            # 3. the update
            loss.backward()
            grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip or float("inf"))
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            state.step += 1
            window_tokens += step_tokens
            # 4. report; validate and track the best step
            last = state.step == plan.total_steps
            metrics = {}
            if state.step % cfg.log_every == 0 or state.step == 1 or last:
                metrics = {"loss": loss.item(), "lr": lr, "grad_norm": float(grad_norm), "epoch": epoch,
                           "tokens_per_s": window_tokens / (time.perf_counter() - window_start)}
                window_tokens, window_start = 0, time.perf_counter()
            if state.step % cfg.eval_every == 0 or last:
                metrics.update(validate(state.step))
            if metrics:
                state.history.append({"step": state.step, **metrics})
                log(metrics, state.step)
            if on_step_end is not None:
                on_step_end(state)
    finally:
        for m, p in zip(dropouts, old_rates):
            m.p = p
    return state


# --- sampling ------------------------------------------------------------------------------------


def generate_responses(
    model: GPT,
    tokenizer: Tokenizer,
    prompts: Sequence[str],
    *,
    system: str | None = None,
    max_new_tokens: int | None = None,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
    seed: int | None = None,
) -> list[str]:
    """The assistant's reply to each prompt, up to its <|end|> (or <|endoftext|>), which is not included.

    max_new_tokens defaults to what the context leaves after the longest rendered prompt; a reply that reaches it
    is returned as far as it got.
    """
    chat = chat_tokens(tokenizer)
    rendered = [render(tokenizer, p, system=system).ids for p in prompts]
    if max_new_tokens is None:
        max_new_tokens = max(1, model.config.block_size - max((len(r) for r in rendered), default=0))
    stops = (chat.end, chat.eot)
    out = generate(model, rendered, max_new_tokens, temperature=temperature, top_k=top_k, top_p=top_p,
                   stop_tokens=stops, pad_token=chat.eot, seed=seed)
    return [tokenizer.decode(t[:-1] if t and t[-1] in stops else t) for t in out]


def generate_response(model: GPT, tokenizer: Tokenizer, prompt: str, **kwargs) -> str:
    """`generate_responses` for one prompt (same keyword arguments)."""
    return generate_responses(model, tokenizer, [prompt], **kwargs)[0]
