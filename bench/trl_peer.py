"""The TRL side of the reward-model and PPO benchmarks: TRL 1.12's RewardTrainer and trl.experimental.ppo's PPOTrainer
on GPT-2 models of our `tiny` shape, built from random weights, fed synthetic token ids, timed on the CPU.

TRL is a benchmark extra, never a runtime dependency: install it with `bench/install_peers.sh` (pins in
bench/requirements-peers.txt; trl itself with --no-deps so torch and transformers stay where pyproject.toml has them).
Nothing is downloaded: the models are random-init GPT-2s, the tokenizer is a WordLevel vocabulary built in code,
and the data are seeded random token ids (`synthetic_rankings`), the same data our side is fed.

Fairness: fp32, CPU, the same thread count on both sides, dropout 0, and timing that covers training only (model,
trainer and dataset construction are outside the clock, and the first step(s) are warm-up, excluded).

TRL 1.12 behaviours the benchmark has to work around or account for (read from its source):
  * Every TRL config defaults to gradient_checkpointing=True and bf16=True; both are turned off here (through
    transformers 5's activation_checkpointing, of which gradient_checkpointing is now a deprecated alias).
  * RewardTrainer takes pre-tokenized data as a `datasets.Dataset` with `chosen_ids`/`rejected_ids` columns (it then
    skips tokenization and EOS-appending) and trains on PAIRS: each (chosen, rejected) pair is two rows of one batch,
    so a K-ranking costs 2*C(K,2) sequence forwards (InstructGPT's K-wise batch costs K).
  * PPOTrainer's rollout batch is per_device_train_batch_size * gradient_accumulation_steps, and Accelerate's
    accumulation counter runs across mini-batch boundaries: with num_mini_batches > 1 the optimizer would step only
    once per gradient_accumulation_steps micro-batches, i.e. not once per mini-batch. We set the micro batch to the
    mini-batch and reset the accelerator's accumulation to 1 after construction, so there is one AdamW step per
    mini-batch per PPO epoch (counted and checked).
  * PPOTrainer needs no eval set: with eval_dataset=None and num_sample_generations=0 it never samples completions.
  * An episode is one prompt rolled out and trained on; PPOTrainer runs ceil(total_episodes / batch_size) updates.
  * PPOTrainer calls gc.collect() twice per update; in a process that has imported torch, transformers and
    datasets a full collection takes a good fraction of a second, so the PPO result reports gc_s separately.

Run `python -m bench.trl_peer` for both benchmarks on a small setting.
"""

from __future__ import annotations

import copy
import gc
import math
import os
import random
import tempfile
import time
from itertools import combinations

# No network: never ping a hub (telemetry) or look anything up there.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")

import torch  # noqa: E402

PAD_ID = 0  # the padding id in the synthetic data; real tokens are drawn from 1..vocab_size-1
PAD_TOKEN = "<pad>"


# --- models, tokenizer and data ------------------------------------------------------------------


def gpt2_config(vocab_size: int = 4096, block_size: int = 256, n_layer: int = 4, n_head: int = 4, n_embd: int = 128):
    """A transformers GPT2Config of our `tiny` preset's shape: GPT-2's pre-LN blocks and final LN, tanh GELU
    ("gelu_new"), tied input/output embeddings, N(0, 0.02) init, LayerNorm eps 1e-5, and no dropout."""
    from transformers import GPT2Config

    return GPT2Config(
        vocab_size=vocab_size, n_positions=block_size, n_layer=n_layer, n_head=n_head, n_embd=n_embd,
        activation_function="gelu_new", resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, summary_first_dropout=0.0,
        layer_norm_epsilon=1e-5, initializer_range=0.02, tie_word_embeddings=True,
        bos_token_id=PAD_ID, eos_token_id=PAD_ID, pad_token_id=PAD_ID,
    )


def make_tokenizer(vocab_size: int):
    """A PreTrainedTokenizerFast over a WordLevel vocabulary ("<pad>" = PAD_ID, then "t1" ... "t{vocab_size-1}"),
    built in code: TRL wants a processing_class with a pad token, and the data are already token ids."""
    from tokenizers import Tokenizer
    from tokenizers.models import WordLevel
    from tokenizers.pre_tokenizers import WhitespaceSplit
    from transformers import PreTrainedTokenizerFast

    vocab = {PAD_TOKEN: PAD_ID, **{f"t{i}": i for i in range(1, vocab_size)}}
    core = Tokenizer(WordLevel(vocab, unk_token=PAD_TOKEN))
    core.pre_tokenizer = WhitespaceSplit()
    tok = PreTrainedTokenizerFast(tokenizer_object=core, pad_token=PAD_TOKEN, eos_token=PAD_TOKEN, unk_token=PAD_TOKEN)
    assert tok.pad_token_id == PAD_ID and len(tok) == vocab_size, (tok.pad_token_id, len(tok))
    return tok


def synthetic_rankings(n_prompts: int, k: int, prompt_len: int, response_len: int, vocab_size: int = 4096,
                       seed: int = 0) -> list[dict]:
    """n_prompts rankings of k responses: {"prompt": [prompt_len ids], "responses": k lists of response_len//2 to
    response_len ids, "ranks": a permutation of 0..k-1 (ranks[i] is response i's rank, 0 = best, no ties)}.
    Ids are drawn from 1..vocab_size-1 (never PAD_ID); the same seed gives the same data."""
    if k < 2:
        raise ValueError(f"a ranking needs k >= 2 responses, got {k}")
    rng = random.Random(seed)
    token = lambda: rng.randrange(1, vocab_size)  # noqa: E731
    rankings = []
    for _ in range(n_prompts):
        prompt = [token() for _ in range(prompt_len)]
        responses = [[token() for _ in range(rng.randint(max(1, response_len // 2), response_len))] for _ in range(k)]
        ranks = list(range(k))
        rng.shuffle(ranks)
        rankings.append({"prompt": prompt, "responses": responses, "ranks": ranks})
    return rankings


def pairs_from_rankings(rankings: list[dict]) -> list[tuple[list[int], list[int]]]:
    """All C(K,2) (prompt + chosen, prompt + rejected) token-id pairs of each ranking, ranking by ranking."""
    pairs = []
    for r in rankings:
        prompt, responses, ranks = r["prompt"], r["responses"], r["ranks"]
        for i, j in combinations(range(len(responses)), 2):
            if ranks[i] == ranks[j]:
                continue  # a tie gives no preference
            better, worse = (i, j) if ranks[i] < ranks[j] else (j, i)
            pairs.append((prompt + responses[better], prompt + responses[worse]))
    return pairs


def _trl_version() -> str:
    import trl

    return trl.__version__


def _snapshot(*modules: torch.nn.Module) -> list[torch.Tensor]:
    return [p.detach().clone() for m in modules for p in m.parameters()]


def _no_checkpointing(*modules: torch.nn.Module) -> None:
    for m in modules:
        assert not any(getattr(sub, "gradient_checkpointing", False) for sub in m.modules()), "checkpointing is on"


def _changed(before: list[torch.Tensor], *modules: torch.nn.Module) -> bool:
    after = [p.detach() for m in modules for p in m.parameters()]
    return any(not torch.equal(a, b) for a, b in zip(before, after, strict=True))


def _common_args(output_dir: str, seed: int) -> dict:
    """TrainingArguments shared by both trainers: fp32 on the CPU, nothing written or reported, no eval."""
    return dict(
        output_dir=output_dir, use_cpu=True, bf16=False, fp16=False, activation_checkpointing=False, seed=seed,
        report_to="none", save_strategy="no", eval_strategy="no", logging_strategy="no", disable_tqdm=True,
        dataloader_num_workers=0, dataloader_pin_memory=False, push_to_hub=False,
    )


def _quiet(trainer) -> None:
    """Drop the printer/progress callbacks (PPOTrainer logs every update to stdout through PrinterCallback)."""
    from transformers.trainer_callback import PrinterCallback, ProgressCallback

    trainer.remove_callback(PrinterCallback)
    trainer.remove_callback(ProgressCallback)


class _GcSpans:
    """Records the wall-clock span of every garbage collection (TRL's PPO calls gc.collect() twice per update)."""

    def __init__(self):
        self.spans: list[tuple[float, float]] = []
        self._start = 0.0

    def _callback(self, phase, info):
        if phase == "start":
            self._start = time.perf_counter()
        else:
            self.spans.append((self._start, time.perf_counter()))

    def __enter__(self):
        gc.callbacks.append(self._callback)
        return self

    def __exit__(self, *exc):
        gc.callbacks.remove(self._callback)

    def seconds_after(self, t: float) -> float:
        return sum(b - a for a, b in self.spans if a >= t)


def _step_clock():
    """A TrainerCallback that records perf_counter() at the end of every optimizer step / PPO update."""
    from transformers import TrainerCallback

    class StepClock(TrainerCallback):
        def __init__(self):
            self.ends: list[float] = []
            self.threads = None

        def on_train_begin(self, args, state, control, **kwargs):
            self.threads = torch.get_num_threads()

        def on_step_end(self, args, state, control, **kwargs):
            self.ends.append(time.perf_counter())

    return StepClock()


# --- reward model --------------------------------------------------------------------------------


def trl_reward_benchmark(rankings: list[dict], *, batch_size_pairs: int = 16, steps: int | None = 20,
                         epochs: float = 1.0, warmup_steps: int = 2, threads: int = 2, seed: int = 0,
                         learning_rate: float = 1e-4, vocab_size: int = 4096, block_size: int = 256) -> dict:
    """Train a random-init GPT2ForSequenceClassification reward model with TRL's RewardTrainer on the C(K,2) pairs of
    `rankings`, batch_size_pairs pairs (2x as many sequences) per optimizer step, for `steps` steps (or `epochs`
    epochs over the pairs when steps is None). The first `warmup_steps` steps are not timed.

    Returns pairs_per_s (pairs trained per second over the timed steps, wall clock between the end of the last
    warm-up step and the end of the last step), sequences_forwarded_per_prompt (sequences through the model per
    ranking, counted by a forward hook: TRL gives 2*C(K,2)), steps, timed_steps, wall_s (timed steps),
    train_wall_s (the whole trainer.train() call), loss, gc_s (garbage collection within the timed steps),
    torch_threads, optimizer and the TRL version. TRL's defaults otherwise: AdamW (weight decay 0), linear decay
    to 0 over the run, gradient-norm clip 1.0."""
    torch.set_num_threads(threads)
    from datasets import Dataset
    from transformers import GPT2ForSequenceClassification
    from trl import RewardConfig, RewardTrainer

    pairs = pairs_from_rankings(rankings)
    if not pairs:
        raise ValueError("the rankings give no pairs")
    k = len(rankings[0]["responses"])
    pairs_per_prompt = len(pairs) / len(rankings)
    dataset = Dataset.from_dict({"chosen_ids": [c for c, _ in pairs], "rejected_ids": [r for _, r in pairs]})

    torch.manual_seed(seed)
    config = gpt2_config(vocab_size=vocab_size, block_size=block_size)
    config.num_labels = 1
    model = GPT2ForSequenceClassification(config).float()
    tokenizer = make_tokenizer(vocab_size)

    with tempfile.TemporaryDirectory(prefix="trl-reward-") as out:
        args = RewardConfig(
            **_common_args(out, seed), per_device_train_batch_size=batch_size_pairs,
            max_steps=steps if steps is not None else -1, num_train_epochs=epochs, learning_rate=learning_rate,
            max_length=block_size, dataset_num_proc=None, disable_dropout=True,
        )
        clock = _step_clock()
        trainer = RewardTrainer(model=model, args=args, train_dataset=dataset, processing_class=tokenizer,
                                callbacks=[clock])
        _quiet(trainer)
        _no_checkpointing(model)

        rows_per_forward: list[int] = []
        hook = model.register_forward_hook(
            lambda mod, a, kw, out: rows_per_forward.append(int(kw["input_ids"].shape[0])), with_kwargs=True)
        before = _snapshot(model)
        torch.set_num_threads(threads)
        with _GcSpans() as gcs:
            start = time.perf_counter()
            result = trainer.train()
            train_wall = time.perf_counter() - start
        hook.remove()

    n_steps = len(clock.ends)
    if n_steps <= warmup_steps:
        raise ValueError(f"{n_steps} steps is not more than the {warmup_steps} warm-up steps; train longer")
    if len(rows_per_forward) != n_steps:
        raise AssertionError(f"expected one forward per step, got {len(rows_per_forward)} for {n_steps} steps")
    loss = float(result.training_loss)
    assert math.isfinite(loss), f"reward loss is not finite: {loss}"
    assert _changed(before, model), "RewardTrainer did not change the model's parameters"

    timed_pairs = sum(rows_per_forward[warmup_steps:]) // 2  # each forward is chosen rows then rejected rows
    timed_from = clock.ends[warmup_steps - 1] if warmup_steps else start
    timed_wall = clock.ends[-1] - timed_from
    gc_s = sum(b - a for a, b in gcs.spans if timed_from <= a and b <= clock.ends[-1])
    sequences = sum(rows_per_forward)
    prompts_covered = (sequences // 2) / pairs_per_prompt
    return {
        "library": "trl", "version": _trl_version(), "k": k, "pairs_per_prompt": pairs_per_prompt,
        "batch_size_pairs": batch_size_pairs, "steps": n_steps, "timed_steps": n_steps - warmup_steps,
        "pairs_per_s": timed_pairs / timed_wall, "wall_s": timed_wall, "train_wall_s": train_wall,
        "sequences_forwarded_per_prompt": sequences / prompts_covered, "loss": loss, "gc_s": gc_s,
        "torch_threads": clock.threads, "optimizer": type(trainer.optimizer.optimizer).__name__,
    }


# --- PPO -----------------------------------------------------------------------------------------


def trl_ppo_benchmark(prompts: list[list[int]], *, batch_size: int = 16, mini_batches: int = 1, ppo_epochs: int = 4,
                      response_length: int = 32, total_episodes: int = 64, threads: int = 2, seed: int = 0,
                      temperature: float = 1.0, stop_token_id: int | None = None, learning_rate: float = 3e-6,
                      kl_coef: float = 0.02, vocab_size: int = 4096, block_size: int = 256) -> dict:
    """PPO with trl.experimental.ppo's PPOTrainer: policy = random-init GPT2LMHeadModel, ref policy = a deep copy,
    reward and value models = random-init GPT2ForSequenceClassification(num_labels=1), all of one shape, fp32 CPU.

    Each update rolls out `batch_size` prompts (response_length sampled tokens each, at `temperature`; responses are
    cut after `stop_token_id` when given), then runs `ppo_epochs` epochs of `mini_batches` mini-batches, one AdamW
    step per mini-batch (policy and value share TRL's optimizer). KL coefficient kl_coef (InstructGPT's beta 0.02),
    gamma 1, lambda 0.95, cliprange 0.2, value cliprange 0.2, vf_coef 0.1 (TRL's default), k1 KL estimator.
    `total_episodes` is rounded up to whole updates (TRL's rule). All prompts must have the same length or are
    left-padded with PAD_ID. TRL truncates a response at its first PAD_ID (sampled with probability ~1/vocab per
    token by a random policy), as it treats pad as the end of a response.

    Returns episodes_per_s (episodes over the timed updates: the first update is a warm-up and excluded, so at least
    2 updates are needed), wall_s (timed updates), train_wall_s (whole trainer.train() call), episodes (all
    updates), updates, optimizer_steps, generate_s (time in policy.generate over the timed updates, measured by
    wrapping it: TRL itself reports no per-phase times), gc_s (garbage collection within the timed updates:
    PPOTrainer calls gc.collect() twice per update, a full collection whose cost grows with the process's heap),
    episodes_per_s_without_gc, the last update's losses and KL, and the TRL version. TRL's optimizer defaults:
    AdamW (weight decay 0), linear decay to 0 over the updates; PPO itself does not clip gradients."""
    torch.set_num_threads(threads)
    from datasets import Dataset
    from transformers import GPT2ForSequenceClassification, GPT2LMHeadModel
    from trl.experimental.ppo import PPOConfig, PPOTrainer

    if batch_size % mini_batches:
        raise ValueError(f"batch_size {batch_size} is not a multiple of mini_batches {mini_batches}")
    dataset = Dataset.from_dict({"input_ids": [list(p) for p in prompts]})

    torch.manual_seed(seed)
    config = gpt2_config(vocab_size=vocab_size, block_size=block_size)
    policy = GPT2LMHeadModel(config).float()
    ref_policy = copy.deepcopy(policy)
    head_config = copy.deepcopy(config)
    head_config.num_labels = 1
    reward_model = GPT2ForSequenceClassification(head_config).float()
    value_model = GPT2ForSequenceClassification(head_config).float()
    tokenizer = make_tokenizer(vocab_size)
    tokenizer.padding_side = "left"  # PPOTrainer generates after the query: queries are left-padded

    with tempfile.TemporaryDirectory(prefix="trl-ppo-") as out:
        args = PPOConfig(
            **_common_args(out, seed),
            per_device_train_batch_size=batch_size // mini_batches, gradient_accumulation_steps=mini_batches,
            num_mini_batches=mini_batches, num_ppo_epochs=ppo_epochs, total_episodes=total_episodes,
            local_rollout_forward_batch_size=batch_size, response_length=response_length, temperature=temperature,
            stop_token_id=stop_token_id, learning_rate=learning_rate, kl_coef=kl_coef, kl_estimator="k1",
            gamma=1.0, lam=0.95, cliprange=0.2, cliprange_value=0.2, num_sample_generations=0,
            missing_eos_penalty=None, whiten_rewards=False, sft_model_path="", reward_model_path="",
        )
        clock = _step_clock()
        trainer = PPOTrainer(args=args, processing_class=tokenizer, model=policy, ref_model=ref_policy,
                             reward_model=reward_model, train_dataset=dataset, value_model=value_model,
                             eval_dataset=None, callbacks=[clock])
        _quiet(trainer)
        _no_checkpointing(policy, value_model)
        assert args.batch_size == batch_size and args.local_mini_batch_size == batch_size // mini_batches
        # One optimizer step per mini-batch (see the module docstring): undo the accumulation across mini-batches.
        trainer.accelerator.gradient_accumulation_steps = 1

        optimizer_steps = [0]

        def count_step(*_):
            optimizer_steps[0] += 1

        trainer.optimizer.optimizer.register_step_post_hook(count_step)
        generate_spans: list[tuple[float, float]] = []
        plain_generate = policy.generate

        def timed_generate(*a, **kw):
            t0 = time.perf_counter()
            try:
                return plain_generate(*a, **kw)
            finally:
                generate_spans.append((t0, time.perf_counter()))

        policy.generate = timed_generate
        before = _snapshot(policy, value_model)
        ref_before = _snapshot(ref_policy, reward_model)
        torch.set_num_threads(threads)
        with _GcSpans() as gcs:
            start = time.perf_counter()
            trainer.train()
            train_wall = time.perf_counter() - start
        del policy.generate

    updates = len(clock.ends)
    if updates < 2:
        raise ValueError(f"{updates} update(s): need at least 2 (the first is an untimed warm-up); "
                         f"raise total_episodes")
    expected_steps = updates * ppo_epochs * mini_batches
    assert optimizer_steps[0] == expected_steps, f"{optimizer_steps[0]} optimizer steps, expected {expected_steps}"
    logs = [h for h in trainer.state.log_history if "loss/policy_avg" in h]
    assert len(logs) == updates, f"{len(logs)} PPO logs for {updates} updates"
    for h in logs:
        for key in ("loss/policy_avg", "loss/value_avg", "objective/kl"):
            assert math.isfinite(h[key]), f"PPO {key} is not finite: {h[key]}"
    assert _changed(before, policy, value_model), "PPOTrainer did not change the policy/value parameters"
    assert not _changed(ref_before, ref_policy, reward_model), "PPOTrainer changed the reference or reward model"

    timed_wall = clock.ends[-1] - clock.ends[0]
    timed_episodes = (updates - 1) * batch_size
    generate_s = sum(b - a for a, b in generate_spans if clock.ends[0] <= a and b <= clock.ends[-1])
    gc_s = sum(b - a for a, b in gcs.spans if clock.ends[0] <= a and b <= clock.ends[-1])
    return {
        "library": "trl", "version": _trl_version(), "batch_size": batch_size, "mini_batches": mini_batches,
        "ppo_epochs": ppo_epochs, "response_length": response_length, "updates": updates,
        "episodes": updates * batch_size, "timed_episodes": timed_episodes,
        "episodes_per_s": timed_episodes / timed_wall, "wall_s": timed_wall, "train_wall_s": train_wall,
        "optimizer_steps": optimizer_steps[0], "generate_s": generate_s, "gc_s": gc_s,
        "episodes_per_s_without_gc": timed_episodes / (timed_wall - gc_s),
        "policy_loss": logs[-1]["loss/policy_avg"], "value_loss": logs[-1]["loss/value_avg"],
        "kl": logs[-1]["objective/kl"], "torch_threads": clock.threads,
    }


def main() -> None:
    threads = 2
    load_before = os.getloadavg()[0]
    k, n_prompts, prompt_len, response_len = 4, 32, 16, 32
    rankings = synthetic_rankings(n_prompts, k, prompt_len, response_len, vocab_size=4096, seed=0)
    reward = trl_reward_benchmark(rankings, batch_size_pairs=16, steps=14, warmup_steps=2, threads=threads)
    ppo = trl_ppo_benchmark([r["prompt"] for r in rankings], batch_size=16, mini_batches=1, ppo_epochs=4,
                            response_length=32, total_episodes=64, threads=threads)

    print(f"TRL {reward['version']}, torch {torch.__version__}, {threads} threads, fp32 CPU, GPT-2 tiny shape "
          f"(4 layers, 128 wide, vocab 4096); 1-min load average {load_before:.2f} before, "
          f"{os.getloadavg()[0]:.2f} after (wall-clock figures need a quiet machine)")
    print(f"reward model: {n_prompts} prompts, K={k}, prompt {prompt_len}, "
          f"responses {response_len // 2}-{response_len}")
    print(f"  {'pairs/step':>10} {'steps':>6} {'timed':>6} {'pairs/s':>9} {'timed s':>8} {'seq/prompt':>10} "
          f"{'gc s':>6} {'loss':>7}")
    print(f"  {reward['batch_size_pairs']:>10} {reward['steps']:>6} {reward['timed_steps']:>6} "
          f"{reward['pairs_per_s']:>9.1f} {reward['wall_s']:>8.2f} {reward['sequences_forwarded_per_prompt']:>10.1f} "
          f"{reward['gc_s']:>6.2f} {reward['loss']:>7.4f}")
    print(f"PPO: batch {ppo['batch_size']}, {ppo['mini_batches']} mini-batch(es), {ppo['ppo_epochs']} epochs, "
          f"response {ppo['response_length']} tokens")
    print(f"  {'updates':>7} {'episodes':>8} {'timed':>6} {'episodes/s':>10} {'timed s':>8} {'generate s':>10} "
          f"{'gc s':>6} {'ep/s w/o gc':>11} {'opt steps':>9} {'kl':>8}")
    print(f"  {ppo['updates']:>7} {ppo['episodes']:>8} {ppo['timed_episodes']:>6} {ppo['episodes_per_s']:>10.2f} "
          f"{ppo['wall_s']:>8.2f} {ppo['generate_s']:>10.2f} {ppo['gc_s']:>6.2f} "
          f"{ppo['episodes_per_s_without_gc']:>11.2f} "
          f"{ppo['optimizer_steps']:>9} {ppo['kl']:>8.4f}")


if __name__ == "__main__":
    main()
