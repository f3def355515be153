"""InstructGPT step 2 as a Ray Train job: comparisons -> rankings -> model/reward.py's K-wise training -> a normalised RM.

The driver regroups the comparisons dataset into one ranking per annotation (a prompt, its K ranked responses),
checks it (clear errors before any training), splits it by prompt into train and held-out rankings, renders every
response in the chat format and writes `rankings.json`. Each worker starts the reward model from the SFT policy,
trains, and rank 0 normalises it on reference samples (distinct responses of the comparisons, samples of the
policies being ranked: a seeded sample of `reference_samples` of them, which fixes the mean to about 2% of a
standard deviation) and writes it. Held-out accuracy is measured against the labels and, where the simulated
labeler's gold preference exists, against that.
"""

from __future__ import annotations

import dataclasses
import json
import random
from pathlib import Path

import torch

from model.checkpoint import load_checkpoint, load_extra
from model.errors import InstructflowError
from model.files import atomic_write
from model.reward import (Ranking, RewardConfig, RewardModel, RewardState, load_reward_model, normalise,
                          ranking_accuracy, save_reward_model, score_rankings, train_reward)
from model.sft import render
from model.text import split_of
from model.tokenizer import Tokenizer
from model.train import make_optimizer
from tasks.ray_train import TrainWorker, fit_trainer

METRIC_PREFIX = "rm/"
COLUMNS = ("annotation_id", "prompt", "chosen", "rejected", "chosen_id", "rejected_id", "chosen_rank", "rejected_rank")


# --- comparisons -> rankings ---------------------------------------------------------------------


def rankings_from_comparisons(frame) -> list[dict]:
    """One ranking per annotation: {"annotation_id", "prompt", "ids", "responses", "ranks"}, checked.

    The comparisons of one annotation are all its strict pairs; each response's rank is read back from them, so
    two responses with the same rank and no row between them were tied. A row whose response id names two texts,
    or whose ranks contradict the annotation's other rows, is an error naming the annotation.
    """
    missing = [c for c in COLUMNS if c not in frame.columns]
    if missing:
        raise InstructflowError(f"the comparisons lack the column(s) {missing}; they must come from the rank stage "
                                f"(tasks/ranking.py's comparisons dataset)")
    if not len(frame):
        raise InstructflowError("the comparisons dataset is empty: rank some responses first (the rank flow), "
                                "or point the reward stage at a dataset with comparisons")
    rankings = []
    for annotation_id, rows in frame.groupby("annotation_id", sort=True):
        prompts = set(rows["prompt"])
        if len(prompts) != 1:
            raise InstructflowError(f"annotation {annotation_id}: its comparisons name {len(prompts)} different prompts")
        texts: dict[str, str] = {}
        ranks: dict[str, int] = {}
        for row in rows.itertuples():
            for side in ("chosen", "rejected"):
                rid, text, rank = getattr(row, f"{side}_id"), getattr(row, side), getattr(row, f"{side}_rank")
                if not isinstance(rid, str) or not rid or not isinstance(text, str):
                    raise InstructflowError(f"annotation {annotation_id}: a comparison has no {side} response id/text")
                if texts.setdefault(rid, text) != text or ranks.setdefault(rid, int(rank)) != int(rank):
                    raise InstructflowError(f"annotation {annotation_id}: response {rid} appears with two different "
                                            f"texts or ranks; the comparisons are corrupt, re-export them")
            if int(row.chosen_rank) >= int(row.rejected_rank):
                raise InstructflowError(f"annotation {annotation_id}: a comparison prefers rank {row.chosen_rank} over "
                                        f"rank {row.rejected_rank}; the chosen response must have the better rank")
        ids = sorted(texts, key=lambda r: (ranks[r], r))
        rankings.append({"annotation_id": int(annotation_id), "prompt": prompts.pop(), "ids": ids,
                         "responses": [texts[r] for r in ids], "ranks": [ranks[r] for r in ids]})
    return rankings


def check_known_responses(frame) -> None:
    """Every compared response must be one of the sampled responses its task was made from (when that samples file
    is still on disk): a comparison naming an unknown response id is refused before any training."""
    import pandas as pd

    known: dict[str, dict[tuple[str, str], str]] = {}  # samples file -> (prompt, response id) -> text
    for row in frame.itertuples():
        origin = json.loads(row.origin) if isinstance(getattr(row, "origin", None), str) and row.origin else {}
        samples = origin.get("samples")
        if not samples or not Path(samples).is_file():
            continue
        if samples not in known:
            s = pd.read_parquet(samples)
            known[samples] = {(r.prompt, f"{r.run_id}:{r.draw}"): r.response for r in s.itertuples()}
        for side in ("chosen", "rejected"):
            rid, text = (row.prompt, getattr(row, f"{side}_id")), getattr(row, side)
            if rid not in known[samples]:
                raise InstructflowError(
                    f"annotation {row.annotation_id}: the {side} response {rid[1]!r} is not among the samples its task "
                    f"was made from ({samples}); the comparisons reference an unknown response. Re-collect the "
                    f"project's rankings or drop this annotation")
            if known[samples][rid].strip() != text.strip():
                raise InstructflowError(f"annotation {row.annotation_id}: response {rid[1]!r} differs from the sampled "
                                        f"text in {samples}; the comparisons were edited after export")


def split_rankings(rankings: list[dict], val_fraction: float, seed: int) -> tuple[list[dict], list[dict]]:
    """Held-out rankings by prompt (a prompt's rankings stay together), chosen by a hash of the prompt."""
    train = [r for r in rankings if split_of(r["prompt"], val_fraction, seed) == "train"]
    val = [r for r in rankings if split_of(r["prompt"], val_fraction, seed) == "val"]
    if not train:
        raise InstructflowError(f"all {len(rankings)} rankings fell into the held-out split; rank more prompts or "
                                f"lower val_fraction")
    return train, val


def write_rankings(path: Path, tokenizer: Tokenizer, train: list[dict], val: list[dict], gold=None, *,
                   reference_samples: int | None = None, seed: int = 0) -> Path:
    """Render each ranking's responses (prompt + response + <|end|>) and write rankings.json for the workers.

    gold(prompt, response) -> float, when given, is stored per held-out response for the gold accuracy. The
    reference the reward is normalised on is every distinct response, or a seeded sample of `reference_samples`.
    """
    def rendered(r: dict) -> list[list[int]]:
        return [render(tokenizer, r["prompt"], text).ids for text in r["responses"]]

    reference = list(dict.fromkeys((r["prompt"], text) for r in train + val for text in r["responses"]))
    if reference_samples is not None and len(reference) > reference_samples:
        keep = sorted(random.Random(seed).sample(range(len(reference)), reference_samples))
        reference = [reference[i] for i in keep]
    payload = {
        "train": [[rendered(r), r["ranks"]] for r in train],
        "val": [[rendered(r), r["ranks"]] for r in val],
        "val_gold": [[gold(r["prompt"], t) for t in r["responses"]] for r in val] if gold else None,
        "reference": [render(tokenizer, p, t).ids for p, t in reference],
    }
    return atomic_write(path, json.dumps(payload).encode())


def read_rankings(path: str | Path) -> dict:
    payload = json.loads(Path(path).read_text())
    for split in ("train", "val"):
        payload[split] = [Ranking(tuple(map(tuple, seqs)), tuple(ranks)) for seqs, ranks in payload[split]]
    return payload


def gold_accuracy(rewards: list[list[float]], gold: list[list[float]]) -> dict:
    """Share of response pairs with different gold values that the reward model orders like the gold preference."""
    correct = pairs = 0
    for r, g in zip(rewards, gold):
        for i in range(len(g)):
            for j in range(i + 1, len(g)):
                if g[i] != g[j]:
                    pairs += 1
                    correct += (r[i] - r[j]) * (g[i] - g[j]) > 0
    return {"gold_accuracy": correct / pairs if pairs else float("nan"), "gold_pairs": pairs}


# --- the Ray Train job ---------------------------------------------------------------------------


def worker_loop(job: dict) -> None:
    """One Ray Train worker: start the RM from the SFT policy (or a checkpoint), train, rank 0 normalises and saves."""
    worker = TrainWorker(job)
    rank, device, autocast = worker.rank, worker.device, worker.runtime.autocast_factory
    cfg = RewardConfig(**{**job["reward"], "betas": tuple(job["reward"]["betas"])})
    data = read_rankings(job["rankings"])
    total = cfg.total_steps(len(data["train"]))

    torch.manual_seed(cfg.seed)
    policy, _ = load_checkpoint(job["init"], device=device)
    model = RewardModel.from_gpt(policy)
    del policy
    optimizer = make_optimizer(model, cfg)

    def restore(directory: Path) -> RewardState:
        model.load_state_dict(load_reward_model(directory, device).state_dict())
        extra = load_extra(directory / "extra.pt", device)
        optimizer.load_state_dict(extra["optimizer"])
        return RewardState(step=extra["step"])

    def save(directory: Path, state: RewardState) -> None:
        save_reward_model(model, directory)
        torch.save({"optimizer": optimizer.state_dict(), "step": state.step}, directory / "extra.pt")

    def on_step_end(state: RewardState) -> None:
        worker.on_step_end(state.step, total, {"step": state.step}, lambda directory: save(directory, state))

    state = worker.resume(restore) or RewardState()
    ddp = worker.prepare(model)
    metrics = worker.track(METRIC_PREFIX, "reward model", total, initial=state.step, show=("loss", "val_accuracy"))
    train_reward(ddp, data["train"], data["val"], cfg, pad=job["pad"], log=metrics.add, state=state,
                 optimizer=optimizer, on_step_end=on_step_end, autocast=autocast, rank=rank,
                 world_size=worker.world_size)
    if rank == 0:
        summary: dict = {"train_rankings": len(data["train"]), "val_rankings": len(data["val"]), "steps": total}
        # the held-out responses are scored once: accuracy against the labels, then (normalising is a positive
        # affine map, which keeps every order) against the gold preference
        held_out = score_rankings(model, data["val"], pad=job["pad"], autocast=autocast) if data["val"] else []
        if any(len(set(r.ranks)) > 1 for r in data["val"]):
            labels = ranking_accuracy(held_out, data["val"])
            summary |= {"val_accuracy": labels["accuracy"], "val_loss": labels["loss"], "val_pairs": labels["pairs"]}
        summary |= normalise(model, data["reference"], pad=job["pad"], autocast=autocast)
        if data.get("val_gold"):
            summary |= gold_accuracy([r.tolist() for r in held_out], data["val_gold"])
        save_reward_model(model, job["out_dir"], info={**summary, "tokenizer_sha256": job["tokenizer_sha256"]})
        metrics.add({k: v for k, v in summary.items() if isinstance(v, (int, float))}, total)
    metrics.flush()


def run_reward(*, key: str, job: dict, num_workers: int = 1, use_gpu: bool | None = None,
               max_failures: int = 1) -> dict:
    """Run the reward-model TorchTrainer for `key`; returns the saved model's summary (reward.json)."""
    fit_trainer(worker_loop, job, name=f"reward-{key}", num_workers=num_workers, use_gpu=use_gpu,
                max_failures=max_failures)
    marker = Path(job["out_dir"]) / "reward.json"
    if not marker.is_file():
        raise RuntimeError("the reward-model job ended without writing its model")
    return json.loads(marker.read_text())


def reward_job(*, init: Path, cfg: RewardConfig, rankings: Path, out_dir: Path, pad: int, run_id: str | None,
               checkpoint_every: int, tokenizer_sha256: str) -> dict:
    return {"init": str(init), "reward": dataclasses.asdict(cfg), "rankings": str(rankings), "out_dir": str(out_dir),
            "pad": pad, "run_id": run_id, "checkpoint_every": checkpoint_every, "tokenizer_sha256": tokenizer_sha256}
