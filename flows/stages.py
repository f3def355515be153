"""One flow per stage, for running or scheduling a stage on its own (inputs are the URIs earlier stages returned)."""

from __future__ import annotations

from prefect import flow

from tasks.params import (DemonstrationParams, EvaluateParams, FinetuneParams, IngestParams, PPOParams,
                          PretrainParams, RewardParams, SampleParams, SFTParams, TaskParams, TokenizerParams)
from tasks.rlhf import ppo, reward
from tasks.stages import evaluate, finetune, ingest, pretrain, sample, sft, tokenize


@flow(name="ingest", log_prints=True)
def ingest_flow(params: IngestParams = IngestParams()) -> str:
    """Read, clean, dedupe and split the sources; returns the dataset directory URI."""
    return ingest(params)


@flow(name="tokenizer", log_prints=True)
def tokenizer_flow(dataset_uri: str, params: TokenizerParams = TokenizerParams()) -> str:
    """Tokenise an ingested dataset; returns the tokens.json URI."""
    return tokenize(dataset_uri, params)


@flow(name="pretrain", log_prints=True)
def pretrain_flow(tokens_uri: str, params: PretrainParams = PretrainParams()) -> str:
    """Pretrain a GPT on tokenised shards with Ray Train; returns the checkpoint URI."""
    return pretrain(tokens_uri, params)


@flow(name="finetune", log_prints=True)
def finetune_flow(checkpoint_uri: str, tokenizer_uri: str | None = None, task: TaskParams = TaskParams(),
                  params: FinetuneParams = FinetuneParams()) -> str:
    """GPT-1 fine-tuning of a checkpoint dir or registered model (models:/pretrain@alias) on a labelled task (Ray Train)."""
    return finetune(checkpoint_uri, tokenizer_uri, task, params)


@flow(name="evaluate", log_prints=True)
def evaluate_flow(checkpoint_uri: str, tokenizer_uri: str | None = None, tasks: list[TaskParams] = [TaskParams()],  # noqa: B006
                  params: EvaluateParams = EvaluateParams()) -> str:
    """Zero/one/few-shot evaluation of a checkpoint dir or registered model, no gradient updates; returns results.json's URI."""
    return evaluate(checkpoint_uri, tokenizer_uri, tasks, params)


@flow(name="sft", log_prints=True)
def sft_flow(checkpoint_uri: str, tokenizer_uri: str | None = None,
             demonstrations: DemonstrationParams = DemonstrationParams(), params: SFTParams = SFTParams()) -> str:
    """InstructGPT step 1 on prompt -> demonstration pairs (Ray Train); returns the best-validation checkpoint URI."""
    return sft(checkpoint_uri, tokenizer_uri, demonstrations, params)


@flow(name="sample", log_prints=True)
def sample_flow(policy_uri: str = "models:/sft/latest", tokenizer_uri: str | None = None,
                params: SampleParams = SampleParams()) -> str:
    """K responses per prompt from a policy, on Ray; returns the samples.parquet URI (input of the `rank` flow)."""
    return sample(policy_uri, tokenizer_uri, params)


@flow(name="reward", log_prints=True)
def reward_flow(sft_uri: str = "models:/sft/latest", tokenizer_uri: str | None = None,
                params: RewardParams = RewardParams()) -> str:
    """InstructGPT step 2: the reward model on the comparisons collected so far (Ray Train); returns its URI."""
    return reward(sft_uri, tokenizer_uri, params)


@flow(name="ppo", log_prints=True)
def ppo_flow(reward_uri: str, sft_uri: str = "models:/sft/latest", policy_uri: str | None = None,
             tokenizer_uri: str | None = None, params: PPOParams = PPOParams(), ptx_tokens_uri: str | None = None) -> str:
    """InstructGPT step 3: PPO against a reward model with a KL penalty to SFT (Ray Train); returns the policy URI."""
    return ppo(policy_uri or sft_uri, sft_uri, reward_uri, tokenizer_uri, params, "manual", ptx_tokens_uri)
