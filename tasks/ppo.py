"""InstructGPT step 3 as a Ray Train job: model/rlhf.py's PPO loop in each worker, resumable at any checkpointed iteration.

Each worker loads the policy (the current one: SFT in the first round), the frozen reference (always SFT), the
frozen reward model, and a value function initialised from the reward model with its normalisation folded into
the head. A checkpoint holds the policy, the value function, both optimisers and the loop's state (iteration, KL
controller, EMA, round), so a killed run continues where it was. Rank 0 writes the final policy (the EMA of its
weights when ema_decay is set).
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import torch

from model.checkpoint import load_checkpoint, save_checkpoint
from model.errors import InstructflowError
from model.ppo import EMA
from model.reward import load_reward_model, reward_info
from model.rlhf import PPOConfig, PPOState
from model.rlhf import ppo as ppo_loop
from model.train import make_optimizer
from tasks.ray_train import TrainWorker, fit_trainer

METRIC_PREFIX = "ppo/"


def check_models(policy_dir: Path, reference_dir: Path, reward_dir: Path, tokenizer_sha256: str,
                 max_len: int) -> None:
    """Refuse, before any training, a reward model that cannot judge this policy (clear errors)."""
    policy = json.loads((Path(policy_dir) / "config.json").read_text())
    reference = json.loads((Path(reference_dir) / "config.json").read_text())
    if not (Path(reward_dir) / "reward.json").is_file():
        raise InstructflowError(f"{reward_dir} is not a reward model (no reward.json); give the reward stage's output")
    reward = json.loads((Path(reward_dir) / "config.json").read_text())
    info = reward_info(reward_dir)
    if reward["vocab_size"] != policy["vocab_size"] or reference["vocab_size"] != policy["vocab_size"]:
        raise InstructflowError(f"the reward model's vocabulary ({reward['vocab_size']}) or the reference's "
                                f"({reference['vocab_size']}) differs from the policy's ({policy['vocab_size']}): "
                                f"they must share one tokenizer; train the reward model from this policy's SFT model")
    if info.get("tokenizer_sha256") and info["tokenizer_sha256"] != tokenizer_sha256:
        raise InstructflowError("the reward model was trained with a different tokenizer than the policy's; "
                                "train it again on comparisons rendered with this policy's tokenizer")
    if reference != policy:
        raise InstructflowError("the reference model's config differs from the policy's: PPO's reference is the SFT "
                                "model the policy started from")
    for name, config in (("policy", policy), ("reward model", reward)):
        if config["block_size"] < max_len:
            raise InstructflowError(f"prompts plus max_new_tokens reach {max_len} tokens, more than the {name}'s "
                                    f"context of {config['block_size']}; lower max_new_tokens or shorten the prompts")


def worker_loop(job: dict) -> None:
    """One Ray Train worker: load or restore the four models, run PPO, report checkpoints, rank 0 saves the policy."""
    worker = TrainWorker(job)
    device = worker.device
    cfg = PPOConfig(**{**job["ppo"], "betas": tuple(job["ppo"]["betas"])})
    prompts = json.loads(Path(job["prompts"]).read_text())
    ptx_tokens = None
    if job["ptx_tokens"]:
        from tasks.corpus import read_tokens

        ptx_tokens = torch.from_numpy(read_tokens(Path(job["ptx_tokens"]), job["vocab_size"]).astype("int64"))

    torch.manual_seed(cfg.seed)
    policy, _ = load_checkpoint(job["policy"], device=device)
    ref, _ = load_checkpoint(job["reference"], device=device)
    reward = load_reward_model(job["reward"], device)
    value = load_reward_model(job["reward"], device)
    value.fold_normalisation()
    policy_optimizer, value_optimizer = make_optimizer(policy, cfg), make_optimizer(value, cfg)

    def restore(directory: Path) -> PPOState:
        restored, extra = load_checkpoint(directory / "policy", device=device)
        policy.load_state_dict(restored.state_dict())
        value.load_state_dict(torch.load(directory / "value.pt", map_location=device, weights_only=True))
        policy_optimizer.load_state_dict(extra["policy_optimizer"])
        value_optimizer.load_state_dict(extra["value_optimizer"])
        return PPOState(**extra["state"])

    def save(directory: Path, state: PPOState) -> None:
        extra = {"policy_optimizer": policy_optimizer.state_dict(), "value_optimizer": value_optimizer.state_dict(),
                 "state": {**dataclasses.asdict(state), "history": []}, "round": job["round"]}
        save_checkpoint(policy, directory / "policy", extra=extra)
        torch.save(value.state_dict(), directory / "value.pt")

    def on_iteration_end(state: PPOState, ema: EMA | None) -> None:  # the EMA's state is in state.ema
        summary = {"iteration": state.iteration, "episodes": state.episodes}
        worker.on_step_end(state.iteration, cfg.iterations, summary, lambda directory: save(directory, state))

    state = worker.resume(restore) or PPOState()
    resumed_from = state.episodes
    ddp_policy, ddp_value = worker.prepare(policy), worker.prepare(value)
    metrics = worker.track(METRIC_PREFIX, "ppo", cfg.total_episodes, initial=resumed_from, watch="objective/kl",
                           unit="episode", show=("objective/scores", "objective/kl"))
    state, ema = ppo_loop(ddp_policy, ref, ddp_value, reward, prompts, cfg, pad=job["pad"],
                          stop_tokens=job["stop_tokens"], policy_optimizer=policy_optimizer,
                          value_optimizer=value_optimizer, ptx_tokens=ptx_tokens, log=metrics.add, state=state,
                          on_iteration_end=on_iteration_end, autocast=worker.runtime.autocast_factory,
                          rank=worker.rank, world_size=worker.world_size)
    if worker.rank == 0:
        if ema is not None:
            ema.copy_to(policy)  # InstructGPT C.4: the EMA of the weights is the policy kept
        save_checkpoint(policy, job["out_dir"], extra={"round": job["round"], "episodes": state.episodes,
                                                       "resumed_from": resumed_from})
    metrics.flush()


def run_ppo(*, key: str, job: dict, num_workers: int = 1, use_gpu: bool | None = None, max_failures: int = 1) -> dict:
    """Run the PPO TorchTrainer for `key` (a re-run of the same key resumes its checkpoints); returns final metrics."""
    result = fit_trainer(worker_loop, job, name=f"ppo-{key}", num_workers=num_workers, use_gpu=use_gpu,
                         max_failures=max_failures)
    if not (Path(job["out_dir"]) / "model.pt").is_file():
        raise RuntimeError("the PPO job ended without writing its policy")
    return dict(result.metrics or {})


def ppo_job(*, policy: Path, reference: Path, reward: Path, cfg: PPOConfig, prompts: Path, out_dir: Path, pad: int,
            stop_tokens: list[int], run_id: str | None, checkpoint_every: int, round_name: str,
            ptx_tokens: Path | None, vocab_size: int) -> dict:
    return {"policy": str(policy), "reference": str(reference), "reward": str(reward), "ppo": dataclasses.asdict(cfg),
            "prompts": str(prompts), "out_dir": str(out_dir), "pad": pad, "stop_tokens": stop_tokens,
            "run_id": run_id, "checkpoint_every": checkpoint_every, "round": round_name,
            "ptx_tokens": str(ptx_tokens) if ptx_tokens else None, "vocab_size": vocab_size}
