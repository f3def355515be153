"""Experiment: how the KL controller's settings move PPO's final KL and gold win rate, on a finished demo's state.

Loads the SFT policy, the reward model and the PPO prompts a `make demo` left in INSTRUCTFLOW_STATE_DIR, runs the
demo's PPO (model/rlhf.py, in-process, no Ray) with the given controller settings, and judges the result as the
judge stage does (tasks/judge.py: 300 held-out prompts, gold preference, temperature 1):

    INSTRUCTFLOW_STATE_DIR=/tmp/state .venv/bin/python -m experiments.kl_control --kl-target 3.3 --kl-horizon 512
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import tempfile
import time
from pathlib import Path

import torch

from flows.demo import DEMO_JUDGE, DEMO_PPO
from model.checkpoint import load_checkpoint, save_checkpoint
from model.reward import load_reward_model
from model.rlhf import PPOConfig, ppo
from model.sft import chat_tokens
from model.tokenizer import Tokenizer
from model.train import make_optimizer
from tasks.judge import judge_policies
from tasks.settings import state_dir


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--beta", type=float, default=DEMO_PPO.beta)
    ap.add_argument("--kl-target", type=float, default=DEMO_PPO.kl_target)
    ap.add_argument("--kl-horizon", type=int, default=DEMO_PPO.kl_horizon)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--ema", type=float, default=None, help="keep the EMA of the policy's weights (InstructGPT: 0.992)")
    ap.add_argument("--ppo-epochs", type=int, default=DEMO_PPO.ppo_epochs)
    args = ap.parse_args()
    stages = state_dir() / "stages"
    sft = next((stages / "sft").iterdir()) / "checkpoint"
    reward = next((stages / "reward").iterdir()) / "model"
    tokenizer_path = next((stages / "sft").iterdir()) / "tokenizer.json"
    prompts = json.loads(next((stages / "ppo").iterdir()).joinpath("prompts.json").read_text())
    judged = json.loads(next((stages / "judge").iterdir()).joinpath("samples.json").read_text())
    chat = chat_tokens(Tokenizer.load(tokenizer_path))

    torch.set_num_threads(2)
    torch.manual_seed(args.seed)
    cfg = PPOConfig(total_episodes=DEMO_PPO.total_episodes, batch_size=DEMO_PPO.batch_size,
                    mini_batches=DEMO_PPO.mini_batches, ppo_epochs=args.ppo_epochs, ema_decay=args.ema,
                    learning_rate=DEMO_PPO.learning_rate, beta=args.beta, kl_target=args.kl_target,
                    kl_horizon=args.kl_horizon, warmup_iterations=DEMO_PPO.warmup_iterations,
                    max_new_tokens=DEMO_PPO.max_new_tokens, missing_end_penalty=DEMO_PPO.missing_end_penalty,
                    value_coef=DEMO_PPO.value_coef, seed=args.seed)
    policy, _ = load_checkpoint(sft)
    ref, _ = load_checkpoint(sft)
    rm = load_reward_model(reward)
    value = load_reward_model(reward)
    value.fold_normalisation()
    started = time.perf_counter()
    state, ema = ppo(policy, ref, value, rm, prompts, cfg, pad=chat.eot, stop_tokens=[chat.end, chat.eot],
                     policy_optimizer=make_optimizer(policy, cfg), value_optimizer=make_optimizer(value, cfg))
    if ema is not None:
        ema.copy_to(policy)
    trained = time.perf_counter() - started
    with tempfile.TemporaryDirectory() as tmp:
        save_checkpoint(policy, Path(tmp) / "policy")
        result, _ = judge_policies(str(Path(tmp) / "policy"), str(sft), str(sft), str(reward), str(tokenizer_path),
                                   [row["prompt"] for row in judged], {**DEMO_JUDGE.model_dump(), "best_of_k": 0},
                                   threads=2)
    kl = [round(h["objective/kl"], 2) for h in state.history if "objective/kl" in h]
    print(json.dumps({"settings": {**vars(args)}, "ppo_s": round(trained), "train_kl_last4": kl[-4:],
                      "beta_final": round(state.kl.get("value", args.beta), 3) if state.kl else args.beta,
                      "win_rate": result["win_rate"], "win_low": result["win_rate_low"],
                      "kl_to_sft": round(result["kl_to_sft"], 2), "answer_nll": round(result["answer_nll"], 2),
                      "answer_nll_baseline": round(result["answer_nll_baseline"], 2)}))


if __name__ == "__main__":
    main()
