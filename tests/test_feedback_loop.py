"""The feedback loop for real: Prefect (test harness), Label Studio, Ray Train and MLflow running the `rlhf` flow.

Two rounds of sample -> rank (the simulated labeler, through Label Studio's API) -> reward model -> PPO -> judge ->
promote on a tiny model; a re-run reuses every stage; a PPO worker killed mid-run resumes from its checkpoint; bad
comparisons and mismatched models are refused before any training.
"""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pytest

from labelstudio_server import labelstudio_and_prefect, labelstudio_template  # noqa: F401 (fixtures)
from model.errors import InstructflowError
from ray_faults import run_killing_a_worker
from tasks import tracking
from tasks.params import JudgeParams, PPOParams, RankParams, RewardParams, SampleParams
from tiny_policy import write_tiny_policy

SAMPLE = SampleParams(n_prompts=16, k=3, max_new_tokens=6)
RANK = RankParams(project="feedback loop test", labeler="simulated", noise=0.0, wait="collect", dataset="loop",
                  round="test")
REWARD = RewardParams(dataset="loop", learning_rate=1e-3, batch_size=4, eval_every=2, val_fraction=0.5)
# the random-weight policy's reward model is at chance: PPO runs anyway here, to test its mechanics
PPO = PPOParams(n_prompts=32, total_episodes=32, batch_size=16, mini_batches=2, learning_rate=1e-3, max_new_tokens=6,
                checkpoint_every=1, require_useful_reward=False)
JUDGE = JudgeParams(n_prompts=8, max_new_tokens=6, kl_samples=2)


@pytest.fixture(scope="module")
def services(labelstudio_and_prefect):
    return labelstudio_and_prefect


@pytest.fixture(scope="module")
def sft_model(tmp_path_factory) -> tuple[str, str]:
    return write_tiny_policy(tmp_path_factory.mktemp("sft"))


def stage_runs(stage: str):
    return tracking.client().search_runs([tracking.experiment_id()], f"tags.`{tracking.STAGE_TAG}` = '{stage}'")


@pytest.fixture(scope="module")
def two_rounds(services, sft_model) -> dict:
    """Two feedback rounds of the rlhf flow on the tiny model (the comparisons the other tests train on)."""
    from flows.rlhf import rlhf

    sft, tokenizer = sft_model
    return rlhf(sft, tokenizer, 2, sample_params=SAMPLE, rank_params=RANK, reward_params=REWARD, ppo_params=PPO,
                judge_params=JUDGE)


def test_two_feedback_rounds_then_a_rerun_reuses_every_stage(two_rounds, sft_model):
    from flows.rlhf import rlhf

    sft, tokenizer = sft_model
    result = two_rounds
    first, second = result["rounds"]
    assert first["round"] == "test.1" and second["round"] == "test.2"
    assert first["new_comparisons"] > 0 and second["new_comparisons"] > 0
    client = tracking.client()

    # round 2 sampled from round 1's policy, and its reward model saw both rounds' comparisons
    samples = pd.read_parquet(second["samples"])
    assert samples["policy"].unique().tolist() == [first["policy"]]
    rm_runs = {r.data.tags[tracking.OUTPUT_TAG]: r for r in stage_runs("reward")}
    assert rm_runs[second["reward"]].data.tags["instructflow.comparisons_version"] == "2"
    train_rankings = [int(rm_runs[r["reward"]].data.params["train_rankings"]) for r in (first, second)]
    assert train_rankings[1] > train_rankings[0]
    info = json.loads((Path(second["reward"]) / "reward.json").read_text())
    assert 0 <= info["val_accuracy"] <= 1 and info["gold_pairs"] > 0 and abs(info["raw_std"]) > 0
    assert client.get_metric_history(rm_runs[second["reward"]].info.run_id, "rm/loss")

    # PPO logged under the reference implementations' names, against SFT as its reference
    ppo_runs = {r.data.tags[tracking.OUTPUT_TAG]: r for r in stage_runs("ppo")}
    metrics = ppo_runs[second["policy"]].data.metrics
    for name in ("ppo/objective/kl", "ppo/objective/scores", "ppo/policy/approxkl", "ppo/policy/clipfrac",
                 "ppo/val/vpred", "ppo/episodes_per_s", "ppo/time/generation", "ppo/time/scoring", "ppo/time/update"):
        assert name in metrics
    assert ppo_runs[second["policy"]].data.tags["instructflow.input.policy"] == first["policy"]
    assert ppo_runs[second["policy"]].data.tags["instructflow.input.sft"] == sft

    # judged against SFT on held-out prompts nobody ranked; champion only on a win
    judged = json.loads(Path(second["judgement"]).read_text())
    assert judged["prompts"] == 8 and 0 <= judged["win_rate"] <= 1 and judged["kl_to_sft"] == judged["kl_to_sft"]
    table = json.loads((Path(second["judgement"]).parent / "samples.json").read_text())
    ranked_prompts = set(pd.read_parquet(first["samples"])["prompt"]) | set(samples["prompt"])
    assert not {row["prompt"] for row in table} & ranked_prompts
    policies = client.search_model_versions("name='policy'")
    assert len(policies) == 2 and len(client.search_model_versions("name='reward'")) == 2
    for r in result["rounds"]:
        vs_champion = json.loads(Path(r["promotion"]["judgement"]).read_text())
        assert r["promotion"]["promoted"] == (vs_champion["win_rate"] > 0.5)
    champion = tracking.alias_version("policy", "champion")
    promoted = [r["promotion"]["version"] for r in result["rounds"] if r["promotion"]["promoted"]]
    # MLflow gives the alias's version as a number, the registration returned it as text
    assert (str(champion.version) if champion else None) == (str(promoted[-1]) if promoted else None)

    # the re-run: nothing recomputed, nothing registered twice, no comparison duplicated
    counts = {s: len(stage_runs(s)) for s in ("sample", "reward", "ppo", "judge")}
    again = rlhf(sft, tokenizer, 2, sample_params=SAMPLE, rank_params=RANK, reward_params=REWARD, ppo_params=PPO,
                 judge_params=JUDGE)
    assert [r["policy"] for r in again["rounds"]] == [first["policy"], second["policy"]]
    assert all(r["new_comparisons"] == 0 for r in again["rounds"])
    assert {s: len(stage_runs(s)) for s in counts} == counts
    assert len(client.search_model_versions("name='policy'")) == 2
    assert [r["promotion"] for r in again["rounds"]] == [r["promotion"] for r in result["rounds"]]
    after = tracking.alias_version("policy", "champion")
    assert (after.version if after else None) == (champion.version if champion else None)


def test_a_killed_ppo_run_resumes_from_its_last_checkpoint(two_rounds, sft_model):
    from flows.stages import ppo_flow, reward_flow

    sft, tokenizer = sft_model
    reward_uri = reward_flow(sft, tokenizer, REWARD)  # on all comparisons of the two rounds
    params = PPO.model_copy(update={"total_episodes": 160, "max_failures": 0, "seed": 11})
    # the stage must fail: its only worker is killed and no restart is allowed
    killed, failures = run_killing_a_worker(lambda: ppo_flow(reward_uri, sft, None, tokenizer, params), "ppo")
    assert killed is not None and failures, "the PPO worker was not killed mid-run"

    policy = ppo_flow(reward_uri, sft, None, tokenizer, params)  # the re-run continues the failed MLflow run
    runs = [r for r in stage_runs("ppo") if r.data.params.get("seed") == "11"]
    assert len(runs) == 1 and runs[0].info.status == "FINISHED"
    resumed = tracking.client().get_metric_history(runs[0].info.run_id, "ppo/resumed_from")
    assert resumed and resumed[0].value >= 16  # at least one rollout batch was not redone
    episodes = sorted(m.step for m in tracking.client().get_metric_history(runs[0].info.run_id, "ppo/objective/kl"))
    assert episodes == sorted(set(episodes)) and episodes[-1] == 160  # every batch logged once
    from model.checkpoint import load_extra

    extra = load_extra(Path(policy) / "extra.pt")
    assert extra["episodes"] == 160 and extra["resumed_from"] >= 16

    # a policy judged against a champion that has changed since (another round promoted meanwhile) is not promoted
    from tasks.rlhf import champion_checkpoint, promote, recorded_promotion

    judgement = Path(policy).parent / "stale-judgement.json"
    judgement.write_text(json.dumps({"win_rate": 0.9}))
    judged_against = None if champion_checkpoint() else str(Path(policy).parent / "a-champion-since-replaced")
    with pytest.raises(InstructflowError, match="changed while this round judged"):
        promote.fn(policy, str(judgement), judged_against=judged_against)
    assert recorded_promotion(policy) is None  # no decision taken: a re-run judges again and decides


def write_comparisons(name: str, rows: list[dict]) -> None:
    from tasks.feedback import comparisons_dir
    from tasks.ranking import append_comparisons

    base = {"task_key": "k", "task_id": 1, "annotation_id": 1, "annotator": 1, "chosen_rank": 1, "rejected_rank": 2,
            "lead_time": 1.0, "created_at": "2026-01-01", "updated_at": "2026-01-01", "simulated": True}
    append_comparisons(comparisons_dir(name), [{**base, **row} for row in rows])


def test_bad_comparisons_and_mismatched_models_are_refused_before_training(services, sft_model, tmp_path):
    from flows.stages import ppo_flow, reward_flow

    sft, tokenizer = sft_model
    with pytest.raises(InstructflowError, match="empty: rank some responses first"):
        reward_flow(sft, tokenizer, REWARD.model_copy(update={"dataset": "never-ranked"}))

    samples = tmp_path / "samples.parquet"
    pd.DataFrame([{"prompt": "Add 1 and 2", "response": "3", "draw": 0, "seed": 1, "policy": "p", "run_id": "run"},
                  {"prompt": "Add 1 and 2", "response": "4", "draw": 1, "seed": 2, "policy": "p", "run_id": "run"}]
                 ).to_parquet(samples)
    origin = json.dumps({"samples": str(samples), "round": "r"})
    write_comparisons("unknown-response", [{"prompt": "Add 1 and 2", "chosen": "3", "rejected": "5",
                                            "chosen_id": "run:0", "rejected_id": "run:7", "origin": origin}])
    before = len(stage_runs("reward"))
    with pytest.raises(InstructflowError, match="unknown response"):
        reward_flow(sft, tokenizer, REWARD.model_copy(update={"dataset": "unknown-response"}))
    assert len(stage_runs("reward")) == before  # refused before a run or a worker started

    # a reward model trained for another vocabulary cannot judge this policy
    import torch

    from model.config import GPTConfig
    from model.reward import RewardModel, save_reward_model

    torch.manual_seed(0)
    other = save_reward_model(RewardModel(GPTConfig(vocab_size=999, block_size=64, n_layer=1, n_head=2, n_embd=32)),
                              tmp_path / "other-rm")
    with pytest.raises(InstructflowError, match="vocabulary"):
        ppo_flow(str(other), sft, None, tokenizer, PPO)


def test_a_people_round_trains_its_reward_model_on_peoples_rankings_only(services, sft_model):
    from flows.stages import reward_flow

    sft, tokenizer = sft_model
    rows = [{"annotation_id": 100 + n, "task_id": 100 + n, "task_key": f"k{n}", "annotator": 2 if n % 2 else 1,
             "simulated": bool(n % 2), "prompt": f"Add {n} and 1", "chosen": str(n + 1), "rejected": "x",
             "chosen_id": f"r{n}:0", "rejected_id": f"r{n}:1", "origin": ""} for n in range(16)]
    write_comparisons("mixed", rows)  # 8 rankings by people, 8 by the simulated labeler
    write_comparisons("simulated-only", [r for r in rows if r["simulated"]])

    def trained_on(reward_uri: str) -> dict:
        run = next(r for r in stage_runs("reward") if r.data.tags[tracking.OUTPUT_TAG] == reward_uri)
        return {k: run.data.params[k] for k in ("labeler", "human_rankings", "simulated_rankings",
                                                 "rankings_left_out", "train_rankings", "val_rankings")}

    people = trained_on(reward_flow(sft, tokenizer, REWARD.model_copy(update={"dataset": "mixed"})))
    assert people["labeler"] == "people" and people["human_rankings"] == "8" and people["simulated_rankings"] == "0"
    assert int(people["train_rankings"]) + int(people["val_rankings"]) == 8 and people["rankings_left_out"] == "8"
    mixed = trained_on(reward_flow(sft, tokenizer, REWARD.model_copy(update={"dataset": "mixed", "labeler": "all"})))
    assert (mixed["human_rankings"], mixed["simulated_rankings"], mixed["rankings_left_out"]) == ("8", "8", "0")
    assert int(mixed["train_rankings"]) + int(mixed["val_rankings"]) == 16
    # with no people's rankings at all, the simulated ones are used (and said so); asking for people's is an error
    alone = trained_on(reward_flow(sft, tokenizer, REWARD.model_copy(update={"dataset": "simulated-only"})))
    assert alone["labeler"] == "simulated" and alone["simulated_rankings"] == "8"
    with pytest.raises(InstructflowError, match="no rankings by people"):
        reward_flow(sft, tokenizer, REWARD.model_copy(update={"dataset": "simulated-only", "labeler": "people"}))


def test_a_round_whose_reward_model_is_at_chance_skips_ppo_and_says_so(two_rounds, sft_model):
    from flows.rlhf import rlhf
    from tasks.rlhf import reward_quality

    sft, tokenizer = sft_model
    first = two_rounds["rounds"][0]
    quality = reward_quality(first["reward"])
    if quality["rankings"]:  # at chance, with its interval
        assert quality["low"] <= quality["accuracy"] <= quality["high"] and "at chance" in quality.get("message", "")
    else:  # the tiny round's few strict rankings may all land in training: then nothing shows it learned either
        assert "no held-out rankings" in quality["message"]
    if quality["useful"]:
        pytest.skip("this tiny reward model happened to beat chance")
    policies = len(tracking.client().search_model_versions("name='policy'"))
    again = rlhf(sft, tokenizer, 1, sample_params=SAMPLE, rank_params=RANK.model_copy(update={"round": "test.1"}),
                 reward_params=REWARD, ppo_params=PPO.model_copy(
                     update={"require_useful_reward": True}), judge_params=JUDGE)
    skipped = again["rounds"][0]
    assert skipped["skipped"] == quality["message"] and "policy" not in skipped and "promotion" not in skipped
    assert len(tracking.client().search_model_versions("name='policy'")) == policies
