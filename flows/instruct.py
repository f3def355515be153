"""InstructGPT step 1 and the ranking loop: sft -> sample K responses -> rank them in Label Studio -> comparisons."""

from __future__ import annotations

from pathlib import Path

from prefect import flow

from tasks.feedback import collect_comparisons, require_levels, send_for_ranking, simulated_labeling, wait_for_rankings
from tasks.params import DemonstrationParams, RankParams, SampleParams, SFTParams
from tasks.stages import pipeline_run, sample, sft


def rank_run_name() -> str:
    from prefect.runtime import flow_run

    params = flow_run.parameters.get("params") or {}
    name = params.get("round") if isinstance(params, dict) else getattr(params, "round", None)
    return f"rank-{name or 'round'}"


@flow(name="rank", log_prints=True, flow_run_name=rank_run_name)
def rank(samples_uri: str, k: int = 4, params: RankParams = RankParams(), parent_run_id: str | None = None) -> dict:
    """Send sampled responses to Label Studio, wait for rankings (or collect what is done), append the comparisons."""
    simulated = params.labeler == "simulated"
    project = send_for_ranking(samples_uri, params.project, require_levels(k), params.seed, params.round,
                               simulated_noise=params.noise if simulated else None)
    if simulated and project["already_present"]:  # tasks imported before may be unranked (e.g. a round of people's);
        simulated_labeling(project["project_id"], params.noise, params.seed)  # the new ones came ranked
    if params.wait == "pause":
        wait_for_rankings(project["project_id"], project["url"], params.min_done, params.timeout_s)
    collected = collect_comparisons(project["project_id"], params.project, params.dataset, parent_run_id, params.round)
    return {**project, **collected}


@flow(name="instruct", log_prints=True)
def instruct(
    checkpoint_uri: str,
    tokenizer_uri: str | None = None,
    demonstrations: DemonstrationParams = DemonstrationParams(),
    sft_params: SFTParams = SFTParams(),
    sample_params: SampleParams = SampleParams(),
    rank_params: RankParams = RankParams(),
) -> dict:
    """A pretrained checkpoint to ranked comparisons: SFT, K samples per prompt from the SFT policy, rankings."""
    params = {"checkpoint": checkpoint_uri, "demonstrations": demonstrations.model_dump(), "sft": sft_params.model_dump(),
              "sample": sample_params.model_dump(), "rank": rank_params.model_dump()}
    with pipeline_run("instruct", params) as run_id:
        policy = sft(checkpoint_uri, tokenizer_uri, demonstrations, sft_params, run_id)
        samples = sample(policy, str(Path(policy).parent / "tokenizer.json"), sample_params, run_id)
        ranked = rank(samples, sample_params.k, rank_params, run_id)
    return {"mlflow_run_id": run_id, "sft": policy, "samples": samples, **ranked}
