"""Judging a policy against a baseline on held-out prompts (run as one Ray task): win rate, RM scores, KL to SFT.

Both policies answer every prompt with the same decoding (temperature 1 by default, the distribution PPO trains;
greedy answers are judged too); a judge scores each answer: the simulated labeler's hidden gold preference
(tasks.feedback.gold_preference) or the reward model. The win rate counts a tie as half a win (InstructGPT's §4.1
win rates against the SFT baseline are computed the same way) and comes with its 95% interval over prompts
(Wilson's, counting a tie as half a win).

Diagnostics beside it, so a round that failed says where:
  kl_to_sft            log π(y|x) − log π_SFT(y|x) summed over the response, on temperature-1 samples
  answer_nll           mean per-token loss of the policy's temperature-1 answers under SFT (readability proxy);
  answer_nll_baseline  the same for SFT's own temperature-1 answers
  best_of_k_win_rate   K temperature-1 samples from SFT, the reward model picks one, against one SFT sample: is the
                       reward model useful at all, with no PPO in the way? (judged against SFT only)
"""

from __future__ import annotations

import torch

from model.checkpoint import load_checkpoint
from model.generate import generate
from model.reward import load_reward_model, score
from model.rlhf import response_nll, sequence_kl
from model.sft import chat_tokens, render
from model.tokenizer import Tokenizer
from tasks.stats import proportion_interval


def win_rate(policy_scores: list[float], baseline_scores: list[float]) -> dict:
    """Wins, ties and losses of the policy per prompt, the win rate (a tie counts half) and its 95% interval."""
    outcomes = [1.0 if p > b else 0.5 if p == b else 0.0 for p, b in zip(policy_scores, baseline_scores)]
    wins, ties = outcomes.count(1.0), outcomes.count(0.5)
    n = len(outcomes)
    low, high = proportion_interval(sum(outcomes), n)  # Wilson's, a tie as half a win: sane at 0% and 100% too
    return {"wins": wins, "ties": ties, "losses": n - wins - ties, "win_rate": sum(outcomes) / n,
            "win_rate_low": low, "win_rate_high": high}


class _Answers:
    """Sampled answers of one model to the prompts: token ids (for likelihoods) and text (for judges)."""

    def __init__(self, model, tokenizer: Tokenizer, queries: list[list[int]], temperature: float, max_new_tokens: int,
                 seed: int) -> None:
        chat = chat_tokens(tokenizer)
        self.stops = (chat.end, chat.eot)
        self.tokens = generate(model, queries, max_new_tokens, temperature=temperature, stop_tokens=self.stops,
                               pad_token=chat.eot, seed=seed)
        self.texts = [tokenizer.decode(t[:-1] if t and t[-1] in self.stops else t) for t in self.tokens]


def judge_policies(policy_uri: str, baseline_uri: str, sft_uri: str, reward_uri: str, tokenizer_uri: str,
                   prompts: list[str], params: dict, threads: int | None = None) -> tuple[dict, list[dict]]:
    """(summary, per-prompt table) of the policy against the baseline (torch on `threads` threads when given); see the
    module docstring."""
    from tasks.demonstrations import check, family_of
    from tasks.feedback import gold_preference, has_gold_preference

    if threads:
        torch.set_num_threads(threads)

    tokenizer = Tokenizer.load(tokenizer_uri)
    chat = chat_tokens(tokenizer)
    policy, _ = load_checkpoint(policy_uri)
    baseline, _ = load_checkpoint(baseline_uri)
    sft, _ = load_checkpoint(sft_uri)
    reward = load_reward_model(reward_uri)
    queries = [render(tokenizer, p).ids for p in prompts]
    n, seed, length = len(prompts), params["seed"], params["max_new_tokens"]
    gold_known = all(has_gold_preference(p) for p in prompts)

    def rm_scores(texts: list[str]) -> list[float]:
        return score(reward, [render(tokenizer, p, a).ids for p, a in zip(prompts, texts)], pad=tokenizer.eot_id).tolist()

    def judged(texts: list[str]) -> list[float]:
        if params["judge"] == "gold":
            return [gold_preference(p, a) for p, a in zip(prompts, texts)]
        return rm_scores(texts)

    answers = {"policy": _Answers(policy, tokenizer, queries, params["temperature"], length, seed),
               "baseline": _Answers(baseline, tokenizer, queries, params["temperature"], length, seed + 1)}
    rm = {name: rm_scores(a.texts) for name, a in answers.items()}
    verdict = {name: judged(a.texts) for name, a in answers.items()}
    result = win_rate(verdict["policy"], verdict["baseline"])
    result |= {"judge": params["judge"], "prompts": n, "temperature": params["temperature"],
               "reward_policy": sum(rm["policy"]) / n, "reward_baseline": sum(rm["baseline"]) / n,
               "reward_win_rate": win_rate(rm["policy"], rm["baseline"])["win_rate"]}
    if params["temperature"] > 0:  # greedy answers too: what `chat` shows at temperature 0
        greedy = [judged(_Answers(m, tokenizer, queries, 0.0, length, seed).texts) for m in (policy, baseline)]
        result |= {k.replace("win_rate", "win_rate_greedy") if "win_rate" in k else f"{k}_greedy": v
                   for k, v in win_rate(*greedy).items()}
    if gold_known:
        gold = {name: [gold_preference(p, a) for p, a in zip(prompts, x.texts)] for name, x in answers.items()}
        result |= {"gold_policy": sum(gold["policy"]) / n, "gold_baseline": sum(gold["baseline"]) / n}
    if all(family_of(p) for p in prompts):  # verifiable instructions: the share answered exactly right
        result |= {f"correct_{name}": sum(check(p, a) for p, a in zip(prompts, x.texts)) / n
                   for name, x in answers.items()}

    # how far the policy moved from SFT, and whether its answers still read as SFT-like text
    sampled = answers["policy"] if params["temperature"] == 1.0 else _Answers(policy, tokenizer, queries, 1.0, length, seed)
    sft_sampled = answers["baseline"] if params["temperature"] == 1.0 and baseline_uri == sft_uri else \
        _Answers(sft, tokenizer, queries, 1.0, length, seed + 1)
    kl = [sequence_kl(policy, sft, queries, sampled.tokens, pad=chat.eot, stop_tokens=sampled.stops)]
    for k in range(1, params["kl_samples"]):
        more = _Answers(policy, tokenizer, queries, 1.0, length, seed + 10 + k)
        kl.append(sequence_kl(policy, sft, queries, more.tokens, pad=chat.eot, stop_tokens=more.stops))
    result["kl_to_sft"] = sum(x.mean().item() for x in kl) / len(kl)
    result["answer_nll"] = response_nll(sft, queries, sampled.tokens, pad=chat.eot, stop_tokens=sampled.stops)
    result["answer_nll_baseline"] = response_nll(sft, queries, sft_sampled.tokens, pad=chat.eot,
                                                 stop_tokens=sft_sampled.stops)

    if params.get("best_of_k") and baseline_uri == sft_uri:
        k = params["best_of_k"]
        many = _Answers(sft, tokenizer, [q for q in queries for _ in range(k)], 1.0, length, seed + 2)
        picks = score(reward, [render(tokenizer, p, a).ids for p, a in zip([p for p in prompts for _ in range(k)],
                                                                          many.texts)], pad=tokenizer.eot_id)
        best = [many.texts[i * k + int(picks[i * k:(i + 1) * k].argmax())] for i in range(n)]
        best_of_k = win_rate(judged(best), judged(sft_sampled.texts))
        result |= {"best_of_k": k, "best_of_k_win_rate": best_of_k["win_rate"],
                   "best_of_k_win_rate_low": best_of_k["win_rate_low"],
                   "best_of_k_win_rate_high": best_of_k["win_rate_high"]}

    table = [{"prompt": p, "policy": answers["policy"].texts[i], "baseline": answers["baseline"].texts[i],
              "reward_policy": rm["policy"][i], "reward_baseline": rm["baseline"][i],
              "judged_policy": verdict["policy"][i], "judged_baseline": verdict["baseline"][i]}
             for i, p in enumerate(prompts)]
    return result, table
