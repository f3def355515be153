"""InstructGPT step 2, the reward model (Ouyang et al. 2022, §3.5 "Reward modeling", Appendix C.2): a scalar head and
the K-wise ranking loss.

The reward model is the SFT model with its unembedding replaced by a linear head to one number, read at the last
real token of the rendered conversation (prompt + response + <|end|>). A labeler ranks K responses to one prompt;
that ranking gives C(K,2) comparisons, and InstructGPT trains on all of them as ONE batch element:

    loss(θ) = −1/C(K,2) · E_(x, y_w, y_l) [ log σ(r_θ(x, y_w) − r_θ(x, y_l)) ]

Each response goes through the model once (K forward passes per prompt rather than 2·C(K,2) when pairs are fed
separately), and a prompt with many responses does not outweigh one with few ("if each of the possible C(K,2)
comparisons is treated as a separate data point, then each completion will potentially be used for K − 1
separate gradient updates ... the model overfits after a single epoch", §3.5). Tied responses give no pair by
default, or a pair with target 0.5 (`tie_target`). A plain pairs dataset is rankings of K = 2.

After training a bias and a gain (buffers, not trained) make the rewards of reference samples have mean 0 and
standard deviation 1 (InstructGPT: "normalized using a bias so that the labeler demonstrations achieve a mean
score of 0 before doing RL"; the gain follows lm-human-preference-details' reward normalisation).
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable, Sequence
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from model.config import GPTConfig
from model.errors import InstructflowError
from model.files import atomic_directory
from model.gpt import GPT
from model.train import lr_at, make_optimizer

KIND = "reward"  # written into a saved reward model's reward.json, so a policy checkpoint is never read as one


# --- the model -----------------------------------------------------------------------------------


class RewardModel(nn.Module):
    """A GPT body with a scalar head: one reward per sequence, or one value per position."""

    def __init__(self, config: GPTConfig) -> None:
        super().__init__()
        self.config = config
        self.body = GPT(config)  # its lm_head (tied to the token embedding) is never used
        self.head = nn.Linear(config.n_embd, 1)
        # lm-human-preference-details: the scalar head starts at N(0, 1/sqrt(d_model + 1)), bias 0
        nn.init.normal_(self.head.weight, std=1 / math.sqrt(config.n_embd + 1))
        nn.init.zeros_(self.head.bias)
        self.register_buffer("bias", torch.zeros(()))  # reward = gain * (raw + bias), set by `normalise`
        self.register_buffer("gain", torch.ones(()))

    @classmethod
    def from_gpt(cls, gpt: GPT) -> RewardModel:
        """A reward model whose body starts as a copy of `gpt` (InstructGPT starts from the SFT model)."""
        model = cls(gpt.config).to(gpt.wte.weight.device)
        model.body.load_state_dict(gpt.state_dict())
        return model

    def forward(self, idx: torch.Tensor, lengths: torch.Tensor | None = None,
                attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """Rewards (B,) read at each right-padded sequence's last real token (lengths - 1); without `lengths`, the
        normalised scalar at every position, (B, T) (what PPO's value function reads). Calls go through forward so
        that a DDP-wrapped model synchronises its gradients."""
        hidden = self.body.hidden_states(idx, attention_mask=attention_mask)  # (B, T, C)
        per_position = self.gain * (self.head(hidden).squeeze(-1).float() + self.bias)  # (B, T)
        if lengths is None:
            return per_position
        if bool((lengths < 1).any()) or bool((lengths > idx.size(1)).any()):
            raise InstructflowError("every sequence needs 1..T real tokens to be scored")
        # causal attention: the right padding after a sequence does not change its last token's state
        return per_position.gather(1, (lengths - 1).long().view(-1, 1)).squeeze(1)

    def fold_normalisation(self) -> None:
        """Move gain and bias into the head's weights (gain·(w·h + b + bias)), leaving gain 1 and bias 0.

        A value function initialised from the reward model then trains a plain linear head whose outputs start on
        the scale of the normalised rewards.
        """
        with torch.no_grad():
            self.head.weight.mul_(self.gain)
            self.head.bias.add_(self.bias).mul_(self.gain)
            self.bias.zero_()
            self.gain.fill_(1.0)


def right_pad(sequences: Sequence[Sequence[int]], pad: int, device=None) -> tuple[torch.Tensor, torch.Tensor]:
    """Token-id lists as one right-padded (B, T) tensor and their lengths (B,)."""
    if not sequences or any(len(s) == 0 for s in sequences):
        raise InstructflowError("cannot score an empty list of sequences or an empty sequence")
    lengths = torch.tensor([len(s) for s in sequences], dtype=torch.long)
    idx = torch.full((len(sequences), int(lengths.max())), pad, dtype=torch.long)
    for row, s in enumerate(sequences):
        idx[row, :len(s)] = torch.tensor(s, dtype=torch.long)
    return idx.to(device), lengths.to(device)


@torch.no_grad()
def score(model: RewardModel, sequences: Sequence[Sequence[int]], *, pad: int, batch_size: int = 32,
          autocast=None) -> torch.Tensor:
    """Rewards (N,) of token-id sequences (each truncated to its last block_size tokens), in eval mode.

    Batches are formed in order of length (less padding to compute); the rewards come back in the given order."""
    autocast = autocast or nullcontext
    device = next(model.parameters()).device
    block = model.config.block_size
    was_training = model.training
    model.eval()
    order = sorted(range(len(sequences)), key=lambda i: len(sequences[i]))
    rewards = torch.empty(len(sequences))
    for i in range(0, len(order), batch_size):
        rows = order[i:i + batch_size]
        idx, lengths = right_pad([sequences[r][-block:] for r in rows], pad, device)
        with autocast():
            rewards[rows] = model(idx, lengths).float().cpu()
    model.train(was_training)
    return rewards


@torch.no_grad()
def normalise(model: RewardModel, reference: Sequence[Sequence[int]], *, pad: int, batch_size: int = 32,
              autocast=None) -> dict[str, float]:
    """Set bias and gain so that the reference sequences' rewards have mean 0 and std 1; returns the raw stats."""
    if len(reference) < 2:
        raise InstructflowError("normalising the reward needs at least 2 reference samples")
    model.bias.zero_()
    model.gain.fill_(1.0)
    raw = score(model, reference, pad=pad, batch_size=batch_size, autocast=autocast)
    mean, std = raw.mean().item(), raw.std().item()
    model.bias.fill_(-mean)
    model.gain.fill_(1.0 / max(std, 1e-6))
    return {"raw_mean": mean, "raw_std": std}


# --- rankings and the K-wise loss ----------------------------------------------------------------


@dataclass(frozen=True)
class Ranking:
    """One labeler's ranking of K responses to one prompt: each rendered sequence and its rank (0 = best; equal
    ranks are ties)."""
    sequences: tuple[tuple[int, ...], ...]
    ranks: tuple[int, ...]

    def __post_init__(self) -> None:
        if len(self.sequences) != len(self.ranks) or len(self.sequences) < 2:
            raise InstructflowError(f"a ranking needs at least 2 responses, each with a rank; got "
                                    f"{len(self.sequences)} responses and {len(self.ranks)} ranks")


def ranking_pairs(ranks: Sequence[int], tie_target: float | None = None) -> list[tuple[int, int, float]]:
    """All C(K,2) pairs (better, worse, target) of one ranking: target 1 for a strict pair, `tie_target` for a tie
    (ties are left out when tie_target is None)."""
    pairs = []
    for i in range(len(ranks)):
        for j in range(i + 1, len(ranks)):
            if ranks[i] == ranks[j]:
                if tie_target is not None:
                    pairs.append((i, j, tie_target))
            elif ranks[i] < ranks[j]:
                pairs.append((i, j, 1.0))
            else:
                pairs.append((j, i, 1.0))
    return pairs


@dataclass
class RankingBatch:
    """Rankings flattened for one forward pass: every response once, and index tensors over its pairs."""
    idx: torch.Tensor  # (N, T) right-padded rendered sequences, N = sum of K over the rankings
    lengths: torch.Tensor  # (N,)
    better: torch.Tensor  # (P,) row of the preferred response of each pair
    worse: torch.Tensor  # (P,)
    target: torch.Tensor  # (P,) 1 for a strict pair, the tie target for a tie
    weight: torch.Tensor  # (P,) 1 / (pairs of its ranking) / (rankings with pairs): the K-wise mean of means
    rankings: int  # rankings that contributed at least one pair

    @property
    def pairs(self) -> int:
        return int(self.better.numel())


def collate_rankings(rankings: Sequence[Ranking], pad: int, block_size: int, tie_target: float | None = None,
                     device=None) -> RankingBatch:
    """Stack rankings into one batch; sequences longer than the context keep their last block_size tokens (the
    response end, where the reward is read)."""
    sequences, better, worse, target, weight = [], [], [], [], []
    per_ranking = []
    for ranking in rankings:
        pairs = ranking_pairs(ranking.ranks, tie_target)
        if pairs:
            base = len(sequences)
            sequences += [s[-block_size:] for s in ranking.sequences]
            per_ranking.append(pairs)
            for i, j, t in pairs:
                better.append(base + i)
                worse.append(base + j)
                target.append(t)
                weight.append(1.0 / len(pairs))
    if not per_ranking:
        raise InstructflowError("none of these rankings has a comparison (all responses tied, and ties are not "
                                "trained on); set tie_target=0.5 or collect more rankings")
    idx, lengths = right_pad(sequences, pad, device)
    as_long = lambda xs: torch.tensor(xs, dtype=torch.long, device=device)  # noqa: E731
    weights = torch.tensor(weight, device=device) / len(per_ranking)
    return RankingBatch(idx, lengths, as_long(better), as_long(worse), torch.tensor(target, device=device),
                        weights, len(per_ranking))


LENGTH_GROUP = 64  # sequences per forward pass in rewards_by_length


def rewards_by_length(model: nn.Module, idx: torch.Tensor, lengths: torch.Tensor,
                      group: int = LENGTH_GROUP) -> torch.Tensor:
    """model(idx, lengths), computed in groups of `group` sequences of similar length, each group cut to its longest
    sequence: the same rewards (and gradients) for less padding. A step's K responses to prompts of every length
    padded to the longest cost the demo's reward model 27% more than their tokens; in groups, 8%."""
    order = torch.argsort(lengths, stable=True)
    parts = [model(idx[rows, :int(lengths[rows].max())], lengths[rows]) for rows in order.split(group)]
    return torch.cat(parts)[torch.argsort(order)]


def kwise_loss(rewards: torch.Tensor, batch: RankingBatch) -> tuple[torch.Tensor, dict[str, float]]:
    """InstructGPT's loss: the mean over rankings of the mean over each ranking's pairs of
    −[t·log σ(r_better − r_worse) + (1 − t)·log σ(r_worse − r_better)]; t = 1 for strict pairs, so −log σ(Δ).

    Also returns the accuracy (strict pairs with r_better > r_worse) and the mean margin.
    """
    margin = rewards[batch.better] - rewards[batch.worse]  # (P,)
    per_pair = -(batch.target * F.logsigmoid(margin) + (1 - batch.target) * F.logsigmoid(-margin))
    loss = (batch.weight * per_pair).sum()
    strict = batch.target == 1
    accuracy = (margin[strict] > 0).float().mean().item() if bool(strict.any()) else float("nan")
    return loss, {"accuracy": accuracy, "margin": margin.mean().item()}


def ranking_accuracy(rewards: Sequence[torch.Tensor], rankings: Sequence[Ranking]) -> dict[str, float]:
    """Agreement with the labels from each ranking's rewards (rewards[i] holds ranking i's K rewards): the share of
    strict pairs ordered as the labeler did, and the K-wise loss (the mean over rankings of the mean over each
    ranking's pairs of −log σ(r_better − r_worse)); ties and all-tied rankings are left out."""
    correct, pairs, loss_sum, counted = 0, 0, 0.0, 0
    for r, ranking in zip(rewards, rankings, strict=True):
        strict = ranking_pairs(ranking.ranks)
        if not strict:
            continue
        margin = r[[i for i, _, _ in strict]] - r[[j for _, j, _ in strict]]
        correct += int((margin > 0).sum())
        pairs += len(strict)
        loss_sum += float(-F.logsigmoid(margin).mean())
        counted += 1
    if not pairs:
        raise InstructflowError("no held-out comparison to measure the reward model on")
    return {"accuracy": correct / pairs, "loss": loss_sum / counted, "pairs": pairs}


def score_rankings(model: RewardModel, rankings: Sequence[Ranking], *, pad: int, batch_size: int = 32,
                   autocast=None) -> list[torch.Tensor]:
    """Each ranking's rewards (K,), every response scored once in eval mode."""
    flat = [s for r in rankings for s in r.sequences]
    rewards = score(model, flat, pad=pad, batch_size=batch_size, autocast=autocast) if flat else torch.zeros(0)
    return list(rewards.split([len(r.sequences) for r in rankings]))


def pairwise_accuracy(model: RewardModel, rankings: Sequence[Ranking], *, pad: int, batch_size: int = 32,
                      autocast=None) -> dict[str, float]:
    """Held-out agreement with the labels (ranking_accuracy of the model's rewards)."""
    with_pairs = [r for r in rankings if ranking_pairs(r.ranks)]
    rewards = score_rankings(model, with_pairs, pad=pad, batch_size=batch_size, autocast=autocast)
    return ranking_accuracy(rewards, with_pairs)


# --- the training loop ---------------------------------------------------------------------------


@dataclass
class RewardConfig:
    """InstructGPT's RM recipe (Appendix C.2): one epoch ("the RM overfits after a single epoch", §3.5), a cosine
    learning rate down to 10%, a batch of 64 prompts (each with all of its comparisons). C.2 trains the 6B RM at
    lr 9e-6; tiny models want ~1e-4."""
    learning_rate: float = 9e-6
    batch_size: int = 64  # rankings (prompts) per step, all workers together
    epochs: int = 1
    min_lr_ratio: float = 0.1
    warmup_steps: int = 0
    tie_target: float | None = None  # None: ties give no pair; 0.5: a tie is a pair with target 0.5
    weight_decay: float = 0.0  # not reported for the RM
    betas: tuple[float, float] = (0.9, 0.95)
    grad_clip: float | None = 1.0
    eval_every: int = 25
    eval_batch_size: int = 32
    log_every: int = 5
    seed: int = 0

    def __post_init__(self) -> None:
        for name in ("batch_size", "epochs", "eval_every", "eval_batch_size", "log_every"):
            if getattr(self, name) < 1:
                raise InstructflowError(f"RewardConfig.{name} must be at least 1, got {getattr(self, name)}")
        if self.tie_target is not None and not 0 <= self.tie_target <= 1:
            raise InstructflowError(f"RewardConfig.tie_target must be in [0, 1] or None, got {self.tie_target}")

    def total_steps(self, n_rankings: int) -> int:
        return math.ceil(n_rankings / self.batch_size) * self.epochs


def step_rankings(n: int, step: int, cfg: RewardConfig, rank: int = 0, world_size: int = 1) -> list[int]:
    """The ranking indices worker `rank` trains on at `step`: each epoch is a fresh permutation (seed, epoch); a
    step takes batch_size consecutive ones, wrapping around at the end of an epoch so every step is full."""
    per_epoch = math.ceil(n / cfg.batch_size)
    epoch, position = divmod(step, per_epoch)
    order = torch.randperm(n, generator=torch.Generator().manual_seed(cfg.seed * 1_000_003 + epoch)).tolist()
    chosen = [order[i % n] for i in range(position * cfg.batch_size, (position + 1) * cfg.batch_size)]
    return chosen[rank::world_size]


@dataclass
class RewardState:
    step: int = 0
    history: list[dict] = field(default_factory=list)


def train_reward(
    model: RewardModel,
    train_rankings: Sequence[Ranking],
    val_rankings: Sequence[Ranking],
    cfg: RewardConfig,
    *,
    pad: int,
    log: Callable[[dict, int], None] = lambda metrics, step: None,
    state: RewardState | None = None,
    optimizer: torch.optim.Optimizer | None = None,
    on_step_end: Callable[[RewardState], None] | None = None,
    autocast=None,
    rank: int = 0,
    world_size: int = 1,
) -> RewardState:
    """Train on rankings with the K-wise loss; `log(metrics, step)` gets loss, accuracy, margin, lr, grad_norm,
    pairs_per_s, and at evaluations val_accuracy and val_loss (held-out rankings, measured at step 0 too).

    The model may be DDP-wrapped; worker `rank` of `world_size` trains on its share of each step's rankings.
    """
    if not train_rankings:
        raise InstructflowError("no training rankings: the comparisons dataset is empty")
    if cfg.batch_size % world_size:
        raise InstructflowError(f"RewardConfig.batch_size={cfg.batch_size} does not divide among {world_size} workers")
    autocast = autocast or nullcontext
    core = getattr(model, "module", model)
    device = next(model.parameters()).device
    total = cfg.total_steps(len(train_rankings))
    val_rankings = [r for r in val_rankings if ranking_pairs(r.ranks)]  # all-tied rankings say nothing about accuracy
    state = state or RewardState()
    optimizer = optimizer or make_optimizer(model, cfg)

    def validate() -> dict:
        if not val_rankings:
            return {}
        held_out = pairwise_accuracy(core, val_rankings, pad=pad, batch_size=cfg.eval_batch_size, autocast=autocast)
        return {"val_accuracy": held_out["accuracy"], "val_loss": held_out["loss"]}

    if state.step == 0 and val_rankings:
        metrics = validate()
        state.history.append({"step": 0, **metrics})
        log(metrics, 0)
    model.train()
    window_pairs, window_start = 0, time.perf_counter()
    while state.step < total:
        # 1. this step's rankings: every response once, all pairs of a ranking together
        chosen = [train_rankings[i] for i in step_rankings(len(train_rankings), state.step, cfg, rank, world_size)]
        lr = lr_at(state.step, cfg.learning_rate, warmup_steps=cfg.warmup_steps, total_steps=total,
                   min_ratio=cfg.min_lr_ratio)
        for group in optimizer.param_groups:
            group["lr"] = lr
        with_pairs = [r for r in chosen if ranking_pairs(r.ranks, cfg.tie_target)]
        # 2. the K-wise loss (a worker whose rankings are all ties still joins the gradient all-reduce, with 0)
        if with_pairs:
            batch = collate_rankings(with_pairs, pad, core.config.block_size, cfg.tie_target, device)
            with autocast():
                rewards = rewards_by_length(model, batch.idx, batch.lengths).float()
            loss, stats = kwise_loss(rewards, batch)
            window_pairs += batch.pairs * world_size
        else:
            loss = sum(p.sum() for p in model.parameters()) * 0.0
            stats = {"accuracy": float("nan"), "margin": 0.0}
        if not math.isfinite(loss.item()):
            raise FloatingPointError(f"reward-model loss became {loss.item()} at step {state.step}; lower the learning rate")
        # 3. the update
        loss.backward()
        grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip or float("inf"))
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        state.step += 1
        # 4. report
        last = state.step == total
        metrics = {}
        if state.step % cfg.log_every == 0 or state.step == 1 or last:
            metrics = {"loss": loss.item(), **stats, "lr": lr, "grad_norm": float(grad_norm),
                       "pairs_per_s": window_pairs / (time.perf_counter() - window_start)}
            window_pairs, window_start = 0, time.perf_counter()
        if state.step % cfg.eval_every == 0 or last:
            metrics.update(validate())
        if metrics:
            state.history.append({"step": state.step, **metrics})
            log(metrics, state.step)
        if on_step_end is not None:
            on_step_end(state)
    return state


# --- saving --------------------------------------------------------------------------------------


def save_reward_model(model: RewardModel, directory: str | Path, info: dict | None = None) -> Path:
    """model.pt + config.json + reward.json (kind and `info`, e.g. the normalisation stats), written atomically."""
    directory = Path(directory)
    with atomic_directory(directory) as staging:
        torch.save(model.state_dict(), staging / "model.pt")
        (staging / "config.json").write_text(json.dumps(model.config.to_dict(), indent=2))
        (staging / "reward.json").write_text(json.dumps({"kind": KIND, **(info or {})}, indent=2))
    return directory


def load_reward_model(directory: str | Path, device: str | torch.device = "cpu") -> RewardModel:
    directory = Path(directory)
    marker = directory / "reward.json"
    if not marker.is_file() or json.loads(marker.read_text()).get("kind") != KIND:
        raise InstructflowError(f"{directory} is not a reward model (no reward.json); train one with the reward stage")
    config = GPTConfig.from_dict(json.loads((directory / "config.json").read_text()))
    model = RewardModel(config).to(device)
    model.load_state_dict(torch.load(directory / "model.pt", map_location=device, weights_only=True))
    return model


def reward_info(directory: str | Path) -> dict:
    return json.loads((Path(directory) / "reward.json").read_text())
