"""Reward-model and PPO throughput, ours against TRL 1.12, side by side in one run on the same shapes and data.

Both sides train GPT-2-shaped models of our `tiny` preset (4 layers, 128 wide, vocab 4096, dropout 0) from random
weights, in fp32 on the CPU with the same thread count, on the same seeded synthetic token ids
(bench/trl_peer.synthetic_rankings). Timing covers training only and leaves out warm-up steps.

  reward model: K = 4 ranked responses per prompt. Each step forwards the same number of sequences on both sides
      (TRL: 16 pairs = 32 sequences; ours: 8 prompts x 4 responses = 32 sequences, which hold 8 x C(4,2) = 48
      pairs). Reported: pairs trained per second and sequences forwarded per prompt.
  PPO: the same batch of 16 prompts, 32 sampled tokens per response (no stop token on either side, so both
      generate full length), 4 PPO epochs of one minibatch, policy + reference + reward + value models of one
      shape. Reported: episodes per second (TRL also without its per-update gc.collect() calls).

Run `make bench` (it installs the peer packages first: bench/install_peers.sh). Writes <state>/bench/rlhf.json.
"""

from __future__ import annotations

import copy
import json
import os
import time

import torch

from bench.trl_peer import synthetic_rankings, trl_ppo_benchmark, trl_reward_benchmark

THREADS = 2
K, N_PROMPTS, PROMPT_LEN, RESPONSE_LEN = 4, 64, 16, 32
RM_PROMPTS_PER_STEP, RM_STEPS, RM_WARMUP = 8, 14, 2
PPO_BATCH, PPO_EPOCHS, PPO_RESPONSE, PPO_EPISODES = 16, 4, 32, 64


def tiny_gpt(seed: int):
    from model.config import config_for
    from model.gpt import GPT

    torch.manual_seed(seed)
    return GPT(config_for("tiny", vocab_size=4096, dropout=0.0))


def our_reward_benchmark(rankings: list[dict]) -> dict:
    """Our K-wise reward-model training on the rankings: pairs/s over RM_STEPS steps after RM_WARMUP warm-up steps."""
    from model.reward import Ranking, RewardConfig, RewardModel, RewardState, train_reward
    from model.train import make_optimizer

    torch.set_num_threads(THREADS)
    data = [Ranking(tuple(tuple(r["prompt"] + resp) for resp in r["responses"]), tuple(r["ranks"])) for r in rankings]
    model = RewardModel.from_gpt(tiny_gpt(0))
    forwarded = []
    model.register_forward_hook(lambda m, args, out: forwarded.append(args[0].size(0)))
    cfg = RewardConfig(learning_rate=1e-4, batch_size=RM_PROMPTS_PER_STEP, epochs=1, log_every=10_000,
                       eval_every=10_000)
    needed = RM_PROMPTS_PER_STEP * (RM_WARMUP + RM_STEPS)
    data = (data * (needed // len(data) + 1))[:needed]
    before = [p.detach().clone() for p in model.parameters()]
    optimizer = make_optimizer(model, cfg)
    stamps = []
    state = train_reward(model, data, [], cfg, pad=0, optimizer=optimizer, state=RewardState(),
                         on_step_end=lambda s: stamps.append(time.perf_counter()))
    timed = stamps[-1] - stamps[RM_WARMUP - 1]
    pairs_per_step = RM_PROMPTS_PER_STEP * K * (K - 1) // 2
    assert any(not torch.equal(a, b) for a, b in zip(before, model.parameters())), "the reward model did not train"
    return {"pairs_per_s": pairs_per_step * RM_STEPS / timed, "sequences_forwarded_per_prompt": sum(forwarded) / len(data),
            "pairs_per_step": pairs_per_step, "sequences_per_step": RM_PROMPTS_PER_STEP * K, "steps": state.step,
            "timed_steps": RM_STEPS, "wall_s": timed}


def our_ppo_benchmark(prompts: list[list[int]]) -> dict:
    """Our PPO loop: episodes/s over the updates after the first (a warm-up), with the phase split."""
    from model.reward import RewardModel
    from model.rlhf import PPOConfig, ppo
    from model.train import make_optimizer

    torch.set_num_threads(THREADS)
    policy = tiny_gpt(0)
    ref = copy.deepcopy(policy)
    reward = RewardModel.from_gpt(tiny_gpt(1))
    value = copy.deepcopy(reward)
    cfg = PPOConfig(total_episodes=PPO_EPISODES, batch_size=PPO_BATCH, mini_batches=1, ppo_epochs=PPO_EPOCHS,
                    learning_rate=3e-6, max_new_tokens=PPO_RESPONSE, missing_end_penalty=None, warmup_iterations=0)
    stamps = []
    state, _ = ppo(policy, ref, value, reward, prompts, cfg, pad=0, stop_tokens=[],
                   policy_optimizer=make_optimizer(policy, cfg), value_optimizer=make_optimizer(value, cfg),
                   on_iteration_end=lambda s, ema: stamps.append(time.perf_counter()))
    timed = stamps[-1] - stamps[0]
    later = state.history[1:]
    split = {k: sum(h[f"time/{k}"] for h in later) for k in ("generation", "scoring", "update")}
    return {"episodes_per_s": PPO_BATCH * (len(stamps) - 1) / timed, "wall_s": timed, "episodes": state.episodes,
            "timed_episodes": PPO_BATCH * (len(stamps) - 1), **{f"{k}_s": v for k, v in split.items()},
            "kl": state.history[-1]["objective/kl"]}


def main() -> None:
    from tasks.settings import state_dir

    load_before = os.getloadavg()[0]
    rankings = synthetic_rankings(N_PROMPTS, K, PROMPT_LEN, RESPONSE_LEN, vocab_size=4096, seed=0)
    prompts = [r["prompt"] for r in rankings[:PPO_BATCH * 2]]
    results = {
        "ours_reward": our_reward_benchmark(rankings),
        "trl_reward": trl_reward_benchmark(rankings, batch_size_pairs=RM_PROMPTS_PER_STEP * K // 2,
                                           steps=RM_STEPS + RM_WARMUP, warmup_steps=RM_WARMUP, threads=THREADS),
        "ours_ppo": our_ppo_benchmark(prompts),
        "trl_ppo": trl_ppo_benchmark(prompts, batch_size=PPO_BATCH, mini_batches=1, ppo_epochs=PPO_EPOCHS,
                                     response_length=PPO_RESPONSE, total_episodes=PPO_EPISODES, threads=THREADS),
    }
    ours, trl = results["ours_reward"], results["trl_reward"]
    results["ratios"] = {
        "reward_pairs_per_s": ours["pairs_per_s"] / trl["pairs_per_s"],
        "reward_forward_passes_per_prompt": trl["sequences_forwarded_per_prompt"] / ours["sequences_forwarded_per_prompt"],
        "ppo_episodes_per_s": results["ours_ppo"]["episodes_per_s"] / results["trl_ppo"]["episodes_per_s"],
        "ppo_episodes_per_s_vs_trl_without_gc": results["ours_ppo"]["episodes_per_s"]
        / results["trl_ppo"]["episodes_per_s_without_gc"],
    }
    results["load_average"] = {"before": load_before, "after": os.getloadavg()[0]}
    out = state_dir() / "bench" / "rlhf.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=2, default=str))

    r = results["ratios"]
    print(f"\nreward model, K={K}, {RM_PROMPTS_PER_STEP * K} sequences per step on both sides, {THREADS} threads, fp32 CPU")
    print(f"  ours (K-wise): {ours['pairs_per_s']:8.1f} pairs/s, {ours['sequences_forwarded_per_prompt']:.1f} "
          f"forward passes per prompt")
    print(f"  TRL Reward:    {trl['pairs_per_s']:8.1f} pairs/s, {trl['sequences_forwarded_per_prompt']:.1f} "
          f"forward passes per prompt")
    print(f"  ratio: {r['reward_pairs_per_s']:.2f}x the pairs/s, {r['reward_forward_passes_per_prompt']:.1f}x fewer "
          f"forward passes per prompt")
    o, t = results["ours_ppo"], results["trl_ppo"]
    print(f"PPO, batch {PPO_BATCH}, {PPO_RESPONSE}-token responses, {PPO_EPOCHS} epochs, {PPO_EPISODES} episodes")
    print(f"  ours: {o['episodes_per_s']:6.2f} episodes/s (generation {o['generation_s']:.2f} s, scoring "
          f"{o['scoring_s']:.2f} s, update {o['update_s']:.2f} s over {o['timed_episodes']} timed episodes)")
    print(f"  TRL:  {t['episodes_per_s']:6.2f} episodes/s ({t['episodes_per_s_without_gc']:.2f} without its gc.collect "
          f"calls; generation {t['generate_s']:.2f} s over {t['timed_episodes']} timed episodes)")
    print(f"  ratio: {r['ppo_episodes_per_s']:.2f}x ({r['ppo_episodes_per_s_vs_trl_without_gc']:.2f}x against TRL "
          f"without gc)")
    print(f"1-min load average {load_before:.2f} before, {results['load_average']['after']:.2f} after; written to {out}")


if __name__ == "__main__":
    main()
