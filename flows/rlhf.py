"""The feedback loop, InstructGPT steps 2 and 3 in rounds: sample -> rank -> reward model -> PPO -> judge -> promote.

Each round samples K responses from the current policy (SFT in the first round), has them ranked in Label Studio,
trains the reward model on ALL comparisons collected so far, runs PPO from the current policy against it (the KL
reference is always SFT), judges the new policy on held-out prompts and promotes it to `policy@champion` when it
beats the current champion (or SFT). Every stage is cached by its inputs: a re-run after a failure resumes at the
stage that failed, and finished rounds are not redone.
"""

from __future__ import annotations

from prefect import flow
from prefect.runtime import flow_run

from flows.instruct import rank
from tasks.feedback import labelstudio_ready
from tasks.params import JudgeParams, PPOParams, RankParams, RewardParams, SampleParams
from tasks.report_card import round_report_card
from tasks.rlhf import champion_checkpoint, judge, ppo, promote, recorded_promotion, reward, reward_quality
from tasks.settings import state_dir
from tasks.stages import pipeline_run, resolve_model, sample


def round_run_name() -> str:
    """The flow run's name: its round (a scheduled round is named by its scheduled start), e.g. rlhf-round-20261203T0900."""
    rank = flow_run.parameters.get("rank_params") or RankParams()
    name = rank.get("round") if isinstance(rank, dict) else getattr(rank, "round", None)
    if not name or name == "auto":
        name = f"round-{flow_run.scheduled_start_time:%Y%m%dT%H%M}"
    return f"rlhf-{name}"


@flow(name="rlhf", log_prints=True, flow_run_name=round_run_name)
def rlhf(
    sft_uri: str = "models:/sft/latest",
    tokenizer_uri: str | None = None,
    rounds: int = 1,
    from_champion: bool = False,
    sample_params: SampleParams = SampleParams(),
    rank_params: RankParams = RankParams(),
    reward_params: RewardParams = RewardParams(),
    ppo_params: PPOParams = PPOParams(),
    judge_params: JudgeParams = JudgeParams(),
    ptx_tokens_uri: str | None = None,
) -> dict:
    """N feedback rounds from the SFT policy (or from policy@champion with from_champion); returns each round's URIs."""
    params = {"sft": sft_uri, "rounds": rounds, "from_champion": from_champion, "sample": sample_params.model_dump(),
              "rank": rank_params.model_dump(), "reward": reward_params.model_dump(), "ppo": ppo_params.model_dump(),
              "judge": judge_params.model_dump()}
    if rank_params.round == "auto":  # a scheduled round: new round name and fresh samples for each scheduled run
        rank_params, sample_params = scheduled_round(rank_params, sample_params)
    sft, tokenizer = resolve_model(sft_uri, tokenizer_uri)
    policy = (champion_checkpoint() or sft) if from_champion else sft
    results = []
    with pipeline_run("rlhf", params) as run_id:
        for n in range(1, rounds + 1):
            name = f"{rank_params.round}.{n}" if rounds > 1 else rank_params.round
            labelstudio = labelstudio_ready.submit()  # Label Studio starts while the policy samples
            samples = sample(policy, tokenizer, sample_params.model_copy(update={"seed": sample_params.seed + n - 1}),
                             run_id)
            labelstudio.result()
            ranked = rank(samples, sample_params.k, rank_params.model_copy(update={"round": name}), run_id)
            # all comparisons so far: the dataset as this round left it (the same version on a re-run)
            data = {"dataset": rank_params.dataset, "version": ranked["round_version"]}
            labeler = reward_params.labeler or rank_params.labeler  # people's rankings are not mixed with simulated ones
            reward_model = reward(sft, tokenizer, reward_params.model_copy(update={**data, "labeler": labeler}), run_id)
            quality = reward_quality(reward_model)
            round_ = {"round": name, "samples": samples, "comparisons": ranked["dataset"],
                      "new_comparisons": ranked["new_rows"], "labeler": rank_params.labeler,
                      "labelstudio_project": ranked["url"], "reward": reward_model, "reward_quality": quality}
            if not quality["useful"] and ppo_params.require_useful_reward:
                print(f"round {name}: {quality['message']}. PPO skipped; the policy stays as it was.")
                results.append({**round_, "skipped": quality["message"]})
                continue
            new_policy = ppo(policy, sft, reward_model, tokenizer,
                             ppo_params.model_copy(update={"seed": ppo_params.seed + n - 1}), name, ptx_tokens_uri, run_id)
            versus_sft = judge(new_policy, sft, sft, reward_model, tokenizer, judge_params, **data, parent_run_id=run_id)
            promoted = recorded_promotion(new_policy)  # decided in an earlier run of this round
            if promoted is None:
                champion = champion_checkpoint()
                versus_champion = versus_sft if champion is None else judge(
                    new_policy, champion, sft, reward_model, tokenizer, judge_params, **data, parent_run_id=run_id)
                promoted = promote(new_policy, versus_champion, judged_against=champion)
            results.append({**round_, "policy": new_policy, "judgement": versus_sft, "promotion": promoted})
            policy = new_policy
    card = round_report_card(run_id, results, state_dir() / "reports" / f"rlhf-{run_id}")
    print(f"report card: {card} (also under report/ in MLflow run {run_id})")
    return {"mlflow_run_id": run_id, "sft": sft, "tokenizer": tokenizer, "rounds": results, "report_card": str(card)}


def scheduled_round(rank_params: RankParams, sample_params: SampleParams) -> tuple[RankParams, SampleParams]:
    """Name the round after this flow run's scheduled start (a retry of the run keeps it: its stages are reused)
    and seed the sampling with it, so today's round sends people responses they have not ranked yet."""
    when = flow_run.scheduled_start_time
    name = f"round-{when:%Y%m%dT%H%M}"
    return (rank_params.model_copy(update={"round": name}),
            sample_params.model_copy(update={"seed": int(when.timestamp()) % 2**31}))


if __name__ == "__main__":
    rlhf()
