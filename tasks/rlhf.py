"""InstructGPT steps 2 and 3 as cached Prefect stages: reward (RM on all comparisons so far), ppo, judge, promote.

Each stage is one MLflow run keyed by its inputs and config, like tasks/stages.py's: a re-run after a failure
resumes the stage that failed (PPO from its last checkpoint) and reuses the finished ones. The reward model is
registered as `reward` (alias `candidate`), the PPO policy as `policy` (alias `candidate`); `promote` moves the
`champion` alias to a policy only when it beats the current champion on held-out prompts.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

from prefect import get_run_logger, task
from prefect.cache_policies import NO_CACHE

from model.errors import InstructflowError
from model.files import atomic_write
from model.tokenizer import Tokenizer
from tasks import tracking
from tasks.artifacts import publish_table
from tasks.params import JudgeParams, PPOParams, RewardParams
from tasks.settings import exclusive
from tasks.stages import cached_stage, read_model_config, resolve_model

POLICY_MODEL, REWARD_MODEL = "policy", "reward"


def _sha256(path: str | Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def comparisons_version(dataset_dir: Path, version: int | None) -> tuple[int, str]:
    """The dataset version to train on (the newest when None) and a digest of versions 1..it (the cache key)."""
    from tasks.ranking import read_manifest

    manifest = read_manifest(dataset_dir)
    versions = manifest.get("versions", [])
    if not versions:
        raise InstructflowError(f"the comparisons dataset {dataset_dir} is empty: rank some responses first "
                                f"(the rank flow) before training a reward model")
    chosen = version or versions[-1]["version"]
    if not any(v["version"] == chosen for v in versions):
        raise InstructflowError(f"{dataset_dir} has no version {chosen} (it has 1..{versions[-1]['version']})")
    digest = hashlib.sha256("".join(v["sha256"] for v in versions if v["version"] <= chosen).encode()).hexdigest()
    return chosen, digest


@task(name="reward", cache_policy=NO_CACHE)
def reward(sft_uri: str, tokenizer_uri: str | None, params: RewardParams, parent_run_id: str | None = None) -> str:
    """Train the reward model on the comparisons (versions 1..N), starting from the SFT model; returns its URI."""
    from model.reward import RewardConfig
    from tasks.feedback import comparisons_dir, gold_preference, has_gold_preference
    from tasks.ranking import read_comparisons
    from tasks.reward import (check_known_responses, rankings_from_comparisons, reward_job, run_reward,
                              split_rankings, write_rankings)

    sft_uri, tokenizer_uri = resolve_model(sft_uri, tokenizer_uri)
    dataset = comparisons_dir(params.dataset)
    version, digest = comparisons_version(dataset, params.version)
    # every check on the data happens here, before a worker starts
    frame, counts, params = rankings_of_labeler(read_comparisons(dataset, version), params, dataset)
    rankings = rankings_from_comparisons(frame)
    check_known_responses(frame)
    train, val = split_rankings(rankings, params.val_fraction, params.seed)
    cfg = RewardConfig(learning_rate=params.learning_rate, batch_size=params.batch_size, epochs=params.epochs,
                       tie_target=params.tie_target, eval_every=params.eval_every, seed=params.seed)
    tokenizer = Tokenizer.load(tokenizer_uri)
    key = params.fingerprint(sft_uri, tokenizer_uri, digest)

    def build(run_id: str, out: Path) -> Path:
        gold = gold_preference if val and all(has_gold_preference(r["prompt"]) for r in val) else None
        job = reward_job(init=Path(sft_uri), cfg=cfg,
                         rankings=write_rankings(out / "rankings.json", tokenizer, train, val, gold,
                                                  reference_samples=params.reference_samples, seed=params.seed),
                         out_dir=out / "model", pad=tokenizer.eot_id, run_id=run_id,
                         checkpoint_every=params.checkpoint_every, tokenizer_sha256=_sha256(tokenizer_uri))
        summary = run_reward(key=key, job=job, num_workers=params.num_workers, use_gpu=params.use_gpu,
                             max_failures=params.max_failures)
        summary |= {**counts, "labeler": params.labeler, "train_rankings": len(train), "val_rankings": len(val)}
        tracking.log_metrics(run_id, {f"rm/{k}": v for k, v in counts.items()}, step=0)
        atomic_write(out / "metrics.json", json.dumps(summary, indent=2).encode())
        shutil.copy2(tokenizer_uri, out / "tokenizer.json")
        version_registered = tracking.register_reward_model(run_id, REWARD_MODEL, out / "model", Path(tokenizer_uri),
                                                            aliases=("candidate",))
        tracking.set_tags(run_id, {"instructflow.input.sft": sft_uri, "instructflow.comparisons": str(dataset),
                                   "instructflow.comparisons_version": str(version),
                                   "instructflow.registered": f"models:/{REWARD_MODEL}/{version_registered}"})
        get_run_logger().info("reward model: held-out accuracy %.3f on %s pairs, gold accuracy %s",
                              summary.get("val_accuracy", float("nan")), summary.get("val_pairs", 0),
                              summary.get("gold_accuracy"))
        return out / "model"

    logged = {**params.model_dump(), "comparisons_version": version, "train_rankings": len(train),
              "val_rankings": len(val), **counts}
    return cached_stage("reward", key, logged, parent_run_id, build)


def rankings_of_labeler(frame, params: RewardParams, dataset: Path):
    """The comparisons of the labeler kind the reward model trains on (people's rankings are never drowned by the
    simulated labeler's unless `labeler='all'`), how many rankings of each kind the dataset holds and the RM keeps,
    and the params with the kind resolved (it is part of the cache key)."""
    simulated = frame["simulated"].fillna(False).astype(bool)
    available = {"people": frame.loc[~simulated, "annotation_id"].nunique(),
                 "simulated": frame.loc[simulated, "annotation_id"].nunique()}
    kind = params.labeler or ("people" if available["people"] else "simulated")
    kept = frame if kind == "all" else frame[simulated == (kind == "simulated")]
    if not len(kept):
        raise InstructflowError(f"{dataset} holds no rankings by {kind} (it has {available['people']} by people and "
                                f"{available['simulated']} by the simulated labeler); rank some, or set the reward "
                                f"stage's labeler to 'all' or to the kind it has")
    counts = {"human_rankings": available["people"] if kind in ("people", "all") else 0,
              "simulated_rankings": available["simulated"] if kind in ("simulated", "all") else 0,
              "rankings_left_out": available["people"] + available["simulated"] - kept["annotation_id"].nunique()}
    return kept, counts, params.model_copy(update={"labeler": kind})


@task(name="ppo", cache_policy=NO_CACHE)
def ppo(policy_uri: str, sft_uri: str, reward_uri: str, tokenizer_uri: str | None, params: PPOParams,
        round_name: str = "round-1", ptx_tokens_uri: str | None = None, parent_run_id: str | None = None) -> str:
    """PPO of the policy against the reward model with a KL penalty to SFT (optionally PPO-ptx); returns its URI."""
    from model.rlhf import PPOConfig
    from model.sft import chat_tokens, render
    from tasks.ppo import check_models, ppo_job, run_ppo

    policy_uri, tokenizer_uri = resolve_model(policy_uri, tokenizer_uri)
    sft_uri, _ = resolve_model(sft_uri, tokenizer_uri)
    tokenizer = Tokenizer.load(tokenizer_uri)
    chat = chat_tokens(tokenizer)
    prompts = [render(tokenizer, p).ids for p in params.load_prompts()]
    if not prompts:
        raise InstructflowError("no PPO prompts: give a prompts file with non-empty prompts")
    cfg = PPOConfig(total_episodes=params.total_episodes, batch_size=params.batch_size,
                    mini_batches=params.mini_batches, ppo_epochs=params.ppo_epochs,
                    learning_rate=params.learning_rate, beta=params.beta, kl_target=params.kl_target,
                    kl_horizon=params.kl_horizon, warmup_iterations=params.warmup_iterations,
                    ptx_coef=params.ptx_coef, ema_decay=params.ema_decay, max_new_tokens=params.max_new_tokens,
                    temperature=params.temperature, missing_end_penalty=params.missing_end_penalty,
                    value_coef=params.value_coef, seed=params.seed)
    cfg.local_batch(params.num_workers)  # a batch that does not split among the workers fails here
    check_models(Path(policy_uri), Path(sft_uri), Path(reward_uri), _sha256(tokenizer_uri),
                 max(len(p) for p in prompts) + cfg.max_new_tokens)
    ptx_tokens = None
    if cfg.ptx_coef > 0:
        if not ptx_tokens_uri:
            raise InstructflowError("PPO-ptx (ptx_coef > 0) needs the pretraining tokens: pass the tokenizer stage's "
                                    "tokens.json URI")
        ptx_tokens = Path(ptx_tokens_uri).parent / json.loads(Path(ptx_tokens_uri).read_text())["train"]["file"]
    key = params.fingerprint(policy_uri, sft_uri, reward_uri, tokenizer_uri, ptx_tokens_uri or "")

    def build(run_id: str, out: Path) -> Path:
        prompts_path = atomic_write(out / "prompts.json", json.dumps(prompts).encode())
        job = ppo_job(policy=Path(policy_uri), reference=Path(sft_uri), reward=Path(reward_uri), cfg=cfg,
                      prompts=prompts_path, out_dir=out / "policy", pad=chat.eot, stop_tokens=[chat.end, chat.eot],
                      run_id=run_id, checkpoint_every=params.checkpoint_every, round_name=round_name,
                      ptx_tokens=ptx_tokens, vocab_size=tokenizer.vocab_size)
        final = run_ppo(key=key, job=job, num_workers=params.num_workers, use_gpu=params.use_gpu,
                        max_failures=params.max_failures)
        shutil.copy2(tokenizer_uri, out / "tokenizer.json")
        version = tracking.register_chat_model(run_id, POLICY_MODEL, out / "policy", Path(tokenizer_uri),
                                               aliases=("candidate",))
        tracking.set_tags(run_id, {"instructflow.input.policy": policy_uri, "instructflow.input.sft": sft_uri,
                                   "instructflow.input.reward": reward_uri, "instructflow.round": round_name,
                                   "instructflow.registered": f"models:/{POLICY_MODEL}/{version}"})
        atomic_write(out / "metrics.json", json.dumps({**final, "registered_version": version}, indent=2).encode())
        return out / "policy"

    logged = {**params.model_dump(), "round": round_name, "iterations": cfg.iterations}
    return cached_stage("ppo", key, logged, parent_run_id, build)


def reward_quality(reward_uri: str) -> dict:
    """The reward model's held-out accuracy against the labels with its 95% interval, counting each held-out ranking
    as one unit (its pairs share a prompt and a labeler, so they are not independent), and whether it is above
    chance (the interval's lower end above 0.5). Gold accuracy beside it when the prompts have a gold preference."""
    from tasks.stats import proportion_interval

    summary = json.loads((Path(reward_uri).parent / "metrics.json").read_text())
    accuracy, units = summary.get("val_accuracy"), int(summary.get("val_rankings", 0))
    if accuracy is None or not units:
        return {"accuracy": None, "rankings": units, "useful": False,
                "message": "the reward model has no held-out rankings, so nothing shows it learned the preference"}
    low, high = proportion_interval(accuracy * units, units)
    quality = {"accuracy": accuracy, "low": low, "high": high, "rankings": units, "pairs": summary.get("val_pairs", 0),
               "gold_accuracy": summary.get("gold_accuracy"), "useful": low > 0.5}
    if not quality["useful"]:
        quality["message"] = (f"the reward model is at chance: held-out accuracy {100 * accuracy:.1f}% "
                              f"[{100 * low:.1f}, {100 * high:.1f}] on {units} rankings; rank more responses (or "
                              f"rank them more consistently) before PPO can learn anything from it")
    return quality


def judge_prompts(params: JudgeParams, dataset: str, version: int | None = None) -> list[str]:
    """Held-out prompts for judging: for 'verifiable', held-out prompts that were never sent for ranking (up to the
    dataset's `version`, the one the round ended with: a re-run of the round judges on the same prompts)."""
    import pandas as pd

    from tasks.demonstrations import held_out_prompts
    from tasks.feedback import comparisons_dir
    from tasks.params import SampleParams
    from tasks.ranking import read_comparisons, read_manifest

    if params.prompts == "reviews":  # test sentences: never sampled for ranking, SFT or PPO (training sentences)
        from tasks.reviews import review_prompts

        return review_prompts("test", params.n_prompts)
    if params.prompts != "verifiable":
        return SampleParams(prompts=params.prompts, n_prompts=params.n_prompts).load_prompts()
    directory = comparisons_dir(dataset)
    ranked: set[str] = set()
    if read_manifest(directory).get("versions"):
        frame = read_comparisons(directory, version)
        ranked = set(frame["prompt"])
        # a task whose responses were all tied gives no comparison: its prompt was still sent, so every prompt of
        # the samples the comparisons came from is left out too
        for origin in frame["origin"].dropna().unique() if "origin" in frame.columns else ():
            samples = json.loads(origin).get("samples") if isinstance(origin, str) and origin.startswith("{") else None
            if samples and Path(samples).is_file():
                ranked |= set(pd.read_parquet(samples, columns=["prompt"])["prompt"])
    pool = held_out_prompts(params.n_prompts + len(ranked), seed=params.seed + 7)
    return [p for p in pool if p not in ranked][:params.n_prompts]


@task(name="judge", cache_policy=NO_CACHE)
def judge(policy_uri: str, baseline_uri: str, sft_uri: str, reward_uri: str, tokenizer_uri: str | None,
          params: JudgeParams, dataset: str = "comparisons", version: int | None = None,
          parent_run_id: str | None = None) -> str:
    """Policy vs a baseline on held-out prompts: gold (or RM) win rate, RM scores, KL to SFT; returns judgement.json."""
    import ray

    from tasks.judge import judge_policies
    from tasks.ray_train import ensure_ray, largest_node_cpus

    policy_uri, tokenizer_uri = resolve_model(policy_uri, tokenizer_uri)
    baseline_uri, _ = resolve_model(baseline_uri, tokenizer_uri)
    sft_uri, _ = resolve_model(sft_uri, tokenizer_uri)
    prompts = judge_prompts(params, dataset, version)
    if params.judge == "gold" and params.prompts not in ("verifiable", "reviews"):
        raise InstructflowError("judge='gold' needs built-in prompts ('verifiable' or 'reviews': the gold preference "
                                "is only defined there); use judge='reward' for your own prompts")
    key = params.fingerprint(policy_uri, baseline_uri, sft_uri, reward_uri, tokenizer_uri,
                             hashlib.sha256("\x00".join(prompts).encode()).hexdigest())
    read_model_config(policy_uri)

    def build(run_id: str, out: Path) -> Path:
        ensure_ray()
        cpus = largest_node_cpus()  # one task generating for every prompt: it has a whole node's cores
        remote = ray.remote(num_cpus=cpus)(judge_policies)
        result, table = ray.get(remote.remote(policy_uri, baseline_uri, sft_uri, reward_uri, tokenizer_uri, prompts,
                                              params.model_dump(), threads=cpus))
        atomic_write(out / "samples.json", json.dumps(table, indent=2, ensure_ascii=False).encode())
        path = atomic_write(out / "judgement.json", json.dumps(result, indent=2).encode())
        tracking.log_metrics(run_id, {f"judge/{k}": v for k, v in result.items() if isinstance(v, (int, float))},
                             step=0)
        tracking.client().log_artifact(run_id, str(out / "samples.json"))
        tracking.client().log_table(run_id, {k: [row[k] for row in table] for k in table[0]}, "answers.json")
        tracking.client().log_artifact(run_id, str(path))
        publish_table(table[:50], key="judged-answers",
                      description=f"the first 50 of {len(table)} judged answers: policy vs baseline, with their scores")
        tracking.set_tags(run_id, {"instructflow.input.policy": policy_uri, "instructflow.input.baseline": baseline_uri})
        return path

    return cached_stage("judge", key, {**params.model_dump(), "baseline": baseline_uri, "policy": policy_uri},
                        parent_run_id, build)


PROMOTION_TAG = "instructflow.promotion"


@task(name="promote", cache_policy=NO_CACHE, retries=2, retry_delay_seconds=5)
def promote(policy_uri: str, judgement_uri: str, judged_against: str | None = None) -> dict:
    """Move alias `champion` to the policy's registered version when its judgement (against the current champion,
    whose checkpoint is `judged_against`, or SFT when there is none) is a win rate above one half. The decision is
    recorded on the model version (tag instructflow.promotion), so it is taken once per policy: a re-run of the round
    returns it unchanged.

    Decisions are taken one at a time (a lock in the state dir), and only against the champion that was judged: when
    another round promoted its policy meanwhile, this round stops with a clear error instead of replacing a champion
    it never compared itself with."""
    registered = json.loads((Path(policy_uri).parent / "metrics.json").read_text())["registered_version"]
    with exclusive("promotion"):
        recorded = recorded_promotion(policy_uri)
        if recorded is not None:
            return recorded
        if champion_checkpoint() != judged_against:
            raise InstructflowError(
                f"policy@champion changed while this round judged its policy (it was "
                f"{judged_against or 'not set'}, another round promoted one since); re-run the round: its finished "
                f"stages are reused and its policy is judged against the new champion")
        result = json.loads(Path(judgement_uri).read_text())
        current = tracking.alias_version(POLICY_MODEL, "champion")
        decision = {"version": registered, "win_rate": result["win_rate"], "judgement": judgement_uri,
                    "against": f"version {current.version}" if current else "sft",
                    "promoted": result["win_rate"] > 0.5}
        if decision["promoted"]:
            tracking.set_alias(POLICY_MODEL, "champion", registered)
        tracking.client().set_model_version_tag(POLICY_MODEL, registered, PROMOTION_TAG, json.dumps(decision))
    get_run_logger().info("policy version %s %s (win rate %.3f against %s)", registered,
                          "is the new champion" if decision["promoted"] else "stays a candidate",
                          result["win_rate"], decision["against"])
    return decision


def recorded_promotion(policy_uri: str) -> dict | None:
    """The promotion decision already taken for this PPO policy's registered version, if any."""
    registered = json.loads((Path(policy_uri).parent / "metrics.json").read_text())["registered_version"]
    tags = tracking.client().get_model_version(POLICY_MODEL, registered).tags
    return json.loads(tags[PROMOTION_TAG]) if PROMOTION_TAG in tags else None


def champion_checkpoint() -> str | None:
    """The checkpoint directory of models:/policy@champion, or None when no policy has been promoted yet."""
    if tracking.alias_version(POLICY_MODEL, "champion") is None:
        return None
    checkpoint, _ = tracking.registered_checkpoint(f"models:/{POLICY_MODEL}@champion")
    return str(checkpoint)
