"""Judging a policy against a baseline on held-out prompts (run as one Ray task): win rate, RM scores, KL to SFT.

Both policies answer every prompt with the same decoding (greedy by default); a judge scores each answer: the
simulated labeler's gold preference (tasks.feedback.verifiable_preference) or the reward model. The win rate counts
a tie as half a win (InstructGPT's §4.1 win rates against the SFT baseline are computed the same way). The KL to SFT
is measured on samples at temperature 1 (the distribution KL is defined on): log π(y|x) − log π_SFT(y|x) summed
over the response, averaged over samples.
"""

from __future__ import annotations

from model.checkpoint import load_checkpoint
from model.generate import generate
from model.reward import load_reward_model, score
from model.rlhf import sequence_kl
from model.sft import chat_tokens, generate_responses, render
from model.tokenizer import Tokenizer


def win_rate(policy_scores: list[float], baseline_scores: list[float]) -> dict:
    """Wins, ties and losses of the policy per prompt, and the win rate (a tie counts half)."""
    wins = sum(p > b for p, b in zip(policy_scores, baseline_scores))
    ties = sum(p == b for p, b in zip(policy_scores, baseline_scores))
    n = len(policy_scores)
    return {"wins": wins, "ties": ties, "losses": n - wins - ties, "win_rate": (wins + 0.5 * ties) / n}


def judge_policies(policy_uri: str, baseline_uri: str, sft_uri: str, reward_uri: str, tokenizer_uri: str,
                   prompts: list[str], params: dict) -> tuple[dict, list[dict]]:
    """(summary, per-prompt table) of the policy against the baseline; see the module docstring."""
    from tasks.demonstrations import check, family_of
    from tasks.feedback import verifiable_preference

    tokenizer = Tokenizer.load(tokenizer_uri)
    policy, _ = load_checkpoint(policy_uri)
    baseline, _ = load_checkpoint(baseline_uri)
    sft, _ = load_checkpoint(sft_uri)
    reward = load_reward_model(reward_uri)
    decode = {"temperature": params["temperature"], "max_new_tokens": params["max_new_tokens"], "seed": params["seed"]}
    answers = {name: generate_responses(model, tokenizer, prompts, **decode)
               for name, model in (("policy", policy), ("baseline", baseline))}
    rm = {name: score(reward, [render(tokenizer, p, a).ids for p, a in zip(prompts, texts)],
                      pad=tokenizer.eot_id).tolist() for name, texts in answers.items()}
    verifiable = all(family_of(p) for p in prompts)
    gold = {name: [verifiable_preference(p, a) for p, a in zip(prompts, texts)] for name, texts in answers.items()} \
        if verifiable else None
    judged = gold if params["judge"] == "gold" else rm
    result = win_rate(judged["policy"], judged["baseline"])
    result |= {"judge": params["judge"], "prompts": len(prompts),
               "reward_policy": sum(rm["policy"]) / len(prompts), "reward_baseline": sum(rm["baseline"]) / len(prompts),
               "reward_win_rate": win_rate(rm["policy"], rm["baseline"])["win_rate"]}
    if gold is not None:
        result |= {"gold_policy": sum(gold["policy"]) / len(prompts), "gold_baseline": sum(gold["baseline"]) / len(prompts),
                   "correct_policy": sum(check(p, a) for p, a in zip(prompts, answers["policy"])) / len(prompts),
                   "correct_baseline": sum(check(p, a) for p, a in zip(prompts, answers["baseline"])) / len(prompts)}
    # KL(policy || SFT) on the policy's own samples at temperature 1
    chat = chat_tokens(tokenizer)
    queries = [render(tokenizer, p).ids for p in prompts for _ in range(params["kl_samples"])]
    samples = generate(policy, queries, params["max_new_tokens"], temperature=1.0, stop_tokens=(chat.end, chat.eot),
                       pad_token=chat.eot, seed=params["seed"] + 1)
    kl = sequence_kl(policy, sft, queries, samples, pad=chat.eot, stop_tokens=(chat.end, chat.eot))
    result["kl_to_sft"] = kl.mean().item()
    table = [{"prompt": p, "policy": answers["policy"][i], "baseline": answers["baseline"][i],
              "reward_policy": rm["policy"][i], "reward_baseline": rm["baseline"][i],
              **({"gold_policy": gold["policy"][i], "gold_baseline": gold["baseline"][i]} if gold else {})}
             for i, p in enumerate(prompts)]
    return result, table
