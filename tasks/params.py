"""Typed stage parameters (pydantic): the Prefect UI renders them as forms; their JSON is part of each stage's cache key."""

from __future__ import annotations

import hashlib
import json
from typing import ClassVar, Literal

from pydantic import BaseModel, ConfigDict, Field


class Params(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)
    not_in_key: ClassVar[frozenset[str]] = frozenset()  # knobs that do not change a stage's result

    def fingerprint(self, *inputs: str) -> str:
        """A short hash of these parameters and the stage's input URIs: equal keys mean equal results."""
        values = self.model_dump(mode="json", exclude=set(self.not_in_key))
        payload = json.dumps({"params": values, "inputs": list(inputs)}, sort_keys=True)
        return hashlib.sha256(payload.encode()).hexdigest()[:16]


class IngestParams(Params):
    sources: list[str] = Field(
        default=["carrier:tiny-shakespeare"],
        description="files, directories, globs (txt/jsonl/parquet), http(s) URLs, hf:NAME, or carrier:NAME",
    )
    min_chars: int = Field(200, ge=1, description="documents shorter than this are dropped")
    near_duplicate_threshold: float = Field(0.8, gt=0, le=1, description="drop a document whose word-shingle Jaccard similarity to a kept one reaches this")
    val_fraction: float = Field(0.1, gt=0, lt=1)
    seed: int = 0


class TokenizerParams(Params):
    kind: Literal["bpe", "gpt2"] = Field("bpe", description="train a byte-level BPE, or use OpenAI's GPT-2 encoding")
    vocab_size: int = Field(4096, ge=264, description="for kind=bpe: vocabulary size including specials")
    parallel_chunks: int | None = Field(
        None, ge=1, description="tokenise in this many Ray tasks (None: in-process below 20M characters, else one per CPU)")

    # tokenising in chunks gives exactly the same shards
    not_in_key: ClassVar[frozenset[str]] = frozenset({"parallel_chunks"})


class PretrainParams(Params):
    preset: str = Field("tiny", description="model preset: tiny, gpt1, gpt2, gpt2-medium, ..., gpt3-175b")
    n_layer: int | None = None
    n_head: int | None = None
    n_embd: int | None = None
    block_size: int | None = None
    dropout: float | None = None
    max_steps: int = Field(300, ge=1)
    batch_size: int = Field(8, ge=1, description="sequences per micro-batch per worker")
    seq_len: int | None = Field(None, description="training window; defaults to the model's block_size")
    grad_accum: int = Field(1, ge=1)
    learning_rate: float | None = Field(None, description="defaults to the preset's paper value")
    warmup_steps: int = Field(30, ge=0)
    eval_every: int = Field(100, ge=1)
    checkpoint_every: int = Field(100, ge=1, description="each Ray checkpoint report costs a round trip")
    num_workers: int = Field(1, ge=1, description="Ray Train workers (data parallel)")
    use_gpu: bool | None = Field(None, description="None: use GPUs when the Ray cluster has them")
    placement_strategy: Literal["PACK", "SPREAD"] = Field(
        "PACK", description="PACK: fill one node first; SPREAD: workers on different nodes where possible")
    max_failures: int = Field(1, ge=0, description="worker-group restarts from the last checkpoint before failing")
    compile: bool = Field(False, description="torch.compile the model (pays back only over thousands of steps)")
    snapshots: bool = Field(False, description="keep every checkpoint (each checkpoint_every steps) as a snapshot, for curves over pretraining")
    seed: int = 1337

    # Resuming is exact (data order is fixed by the step), so how often a run checkpoints or how often it may
    # restart does not change its result: a re-run with other values continues the same run. Where the workers
    # run does not change it either (each rank's data follows its rank, not its node).
    not_in_key: ClassVar[frozenset[str]] = frozenset({"checkpoint_every", "max_failures", "compile",
                                                      "placement_strategy"})


class TaskParams(Params):
    name: str = Field("sentiment", description="built-in task (sentiment, entailment, quartz, mmlu) or a jsonl/parquet file")
    kind: Literal["classification", "entailment", "similarity", "multiple_choice", "generative"] | None = Field(
        None, description="for a file: how its rows read (built-in tasks know their kind)")
    text_fields: list[str] | None = Field(None, description="for a file: the text field(s), in order (default ['text'])")
    label_field: str = "label"
    options_field: str = Field("options", description="for multiple_choice files: the list of candidate answers")
    target_field: str = Field("target", description="for generative files: the expected answer")
    labels: list[str] | None = Field(None, description="for a file: the class names (default: the labels found)")
    prompt: str | None = Field(None, description="for a file: the evaluation prompt, {0}/{1} = the text fields")
    verbalizers: list[str] | None = Field(None, description="for a file: the answer word of each class in a prompt")
    test_fraction: float = Field(0.1, gt=0, lt=1, description="held-out share when the file has no split column")
    seed: int = 0

    def load(self):
        """The task's rows (fetched or read) as a tasks.labelled.LabelledTask."""
        from tasks.labelled import load_task

        fields = self.model_dump(exclude={"name"})
        return load_task(self.name, **fields)


class FinetuneParams(Params):
    init: Literal["pretrained", "scratch"] = Field("pretrained", description="start from the checkpoint's weights or a random initialisation of the same shape")
    transfer_layers: int | None = Field(None, ge=0, description="transfer the embeddings and only this many blocks (None: all)")
    lm_weight: float = Field(0.5, ge=0, description="λ in L3 = L2 + λ·L1 (GPT-1: 0.5; 0 turns the auxiliary LM loss off)")
    learning_rate: float = Field(6.25e-5, gt=0, description="GPT-1 §4.1")
    batch_size: int = Field(32, ge=1, description="examples per step (GPT-1 §4.1: 32)")
    epochs: int = Field(3, ge=1, description="GPT-1 §4.1: 3")
    warmup_fraction: float = Field(0.002, ge=0, lt=1, description="GPT-1 §4.1: warmup over 0.2% of training")
    head_dropout: float = Field(0.1, ge=0, lt=1, description="dropout on the classifier input (GPT-1 §4.1: 0.1)")
    dropout: float | None = Field(None, ge=0, lt=1, description="the transformer's dropout (None: the checkpoint's)")
    max_len: int | None = Field(None, ge=8, description="longest input in tokens (None: the model's context); longer ones are truncated")
    max_train_examples: int | None = Field(None, ge=1, description="use only the first N training rows")
    eval_every: int = Field(50, ge=1)
    checkpoint_every: int = Field(200, ge=1)
    num_workers: int = Field(1, ge=1)
    use_gpu: bool | None = None
    max_failures: int = Field(1, ge=0)
    seed: int = 0

    not_in_key: ClassVar[frozenset[str]] = frozenset({"checkpoint_every", "max_failures"})


class EvaluateParams(Params):
    shots: list[int] = Field([0, 1, 4], description="K demonstrations per query; each K is evaluated separately")
    max_examples: int | None = Field(200, ge=1, description="score only the first N held-out examples of each task")
    max_new_tokens: int = Field(16, ge=1, description="for generative tasks")
    skip_unfit: bool = Field(False, description="skip (and report) the K values that do not fit a task's context, instead of refusing the run")
    seed: int = 0


class DemonstrationParams(Params):
    source: str = Field("verifiable", description="'verifiable' (the built-in generated instruction tasks), 'reviews' "
                        "(continue a movie review: tasks/reviews.py) or a jsonl/parquet file of prompt/response rows")
    n_train: int = Field(600, ge=1, description="for built-in sets: training demonstrations")
    n_test: int = Field(60, ge=1, description="for built-in sets: held-out demonstrations (validation loss)")
    test_fraction: float = Field(0.1, gt=0, lt=1, description="for a file without a split column")
    seed: int = 0

    def load(self):
        """The demonstrations as a tasks.demonstrations.DemonstrationSet."""
        from tasks.demonstrations import load_demonstrations, verifiable_demonstrations

        if self.source == "verifiable":
            return verifiable_demonstrations(self.n_train, self.n_test, self.seed)
        if self.source == "reviews":
            from tasks.reviews import review_demonstrations

            return review_demonstrations(self.n_train, self.n_test, self.seed)
        return load_demonstrations(self.source, test_fraction=self.test_fraction, seed=self.seed)


class SFTParams(Params):
    learning_rate: float = Field(9.65e-6, gt=0, description="InstructGPT C.1 (1.3B/6B); tiny models want ~1e-3")
    batch_size: int = Field(32, ge=1, description="packed rows per step (InstructGPT C.1: 32)")
    seq_len: int | None = Field(None, ge=2, description="tokens per packed row (None: the model's context)")
    epochs: int = Field(2, ge=1, description="InstructGPT trains 16; small sets overfit sooner")
    residual_dropout: float | None = Field(0.2, ge=0, lt=1, description="InstructGPT C.1: 0.2")
    eval_every: int = Field(25, ge=1, description="steps between validation losses (the best one is kept)")
    checkpoint_every: int = Field(100, ge=1)
    num_workers: int = Field(1, ge=1)
    use_gpu: bool | None = None
    max_failures: int = Field(1, ge=0)
    seed: int = 0

    not_in_key: ClassVar[frozenset[str]] = frozenset({"checkpoint_every", "max_failures"})


class SampleParams(Params):
    prompts: str = Field("verifiable", description="'verifiable' (held-out built-in prompts), 'reviews' (review "
                         "openings from the training sentences) or a jsonl/parquet file with a prompt field")
    n_prompts: int = Field(16, ge=1, description="how many prompts (the first N)")
    k: int = Field(4, ge=2, le=9, description="responses per prompt (InstructGPT ranked 4 to 9)")
    temperature: float = Field(1.0, ge=0)
    top_p: float | None = Field(0.95, gt=0, le=1)
    max_new_tokens: int = Field(32, ge=1)
    seed: int = 0

    def load_prompts(self) -> list[str]:
        from pathlib import Path

        import pandas as pd

        from model.errors import InstructflowError
        from tasks.demonstrations import held_out_prompts

        if self.prompts == "verifiable":
            return held_out_prompts(self.n_prompts, self.seed)
        if self.prompts == "reviews":
            from tasks.reviews import review_prompts

            return review_prompts("train", self.n_prompts)
        path = Path(self.prompts)
        if not path.is_file():
            raise InstructflowError(f"prompts file {path} does not exist; give a jsonl/parquet file with a 'prompt' field")
        frame = pd.read_parquet(path) if path.suffix == ".parquet" else pd.read_json(path, lines=True)
        if "prompt" not in frame.columns:
            raise InstructflowError(f"prompts file {path} has no 'prompt' field; its fields are {list(frame.columns)}")
        prompts = [p for p in frame["prompt"].tolist() if isinstance(p, str) and p.strip()]
        if not prompts:
            raise InstructflowError(f"prompts file {path} has no non-empty prompts")
        return list(dict.fromkeys(prompts))[:self.n_prompts]


# Names that become folder names (datasets, rounds): no path separators, no "..", no NUL, nothing hidden
SAFE_NAME = r"^[A-Za-z0-9][A-Za-z0-9_-]*(\.[A-Za-z0-9_-]+)*$"


class RankParams(Params):
    project: str = Field("instructflow ranking", min_length=3, description="Label Studio project title (found by exact match, else created)")
    labeler: Literal["people", "simulated"] = Field("people", description="'simulated': the SIMULATED labeler ranks by its gold preference")
    noise: float = Field(0.1, ge=0, le=1, description="simulated labeler: chance to swap each adjacent pair")
    wait: Literal["pause", "collect"] = Field("pause", description="'pause' until resumed or min_done tasks are ranked; 'collect' what is done now (schedules)")
    min_done: int | None = Field(None, ge=1, description="resume by itself once this many tasks are ranked (None: all)")
    timeout_s: int = Field(3600, ge=1, description="longest pause; then what is ranked is collected")
    dataset: str = Field("comparisons", pattern=SAFE_NAME, description="the comparisons dataset to append to "
                         "(a folder name: letters, digits, '.', '_', '-')")
    round: str = Field("round-1", pattern=SAFE_NAME, description="a label stored with every task (the feedback "
                       "round); 'auto': named after the flow run's scheduled time, so each scheduled run is a new round")
    seed: int = 0


class RewardParams(Params):
    dataset: str = Field("comparisons", pattern=SAFE_NAME,
                         description="the comparisons dataset (a folder under <state>/datasets/) to train on")
    version: int | None = Field(None, ge=1, description="train on versions 1..N of the dataset (None: all so far)")
    labeler: Literal["people", "simulated", "all"] | None = Field(
        None, description="whose rankings to train on: people's, the simulated labeler's, or 'all' (mixed). None: in a "
        "feedback round, the round's labeler; on its own, people's rankings when there are any, else the simulated ones")
    learning_rate: float = Field(9e-6, gt=0, description="InstructGPT C.2 (6B RM): 9e-6; tiny models want ~1e-4")
    batch_size: int = Field(64, ge=1, description="rankings (prompts, each with all its comparisons) per step; C.2: 64")
    epochs: int = Field(1, ge=1, description="InstructGPT: one epoch, more overfits")
    tie_target: float | None = Field(None, ge=0, le=1, description="None: ties give no pair; 0.5: a tie trains toward equal rewards")
    val_fraction: float = Field(0.2, ge=0, lt=1, description="share of prompts held out for accuracy")
    reference_samples: int | None = Field(2048, ge=2, description="distinct ranked responses (a seeded sample) the "
                                          "reward is normalised on, to mean 0 and std 1; None: all of them")
    eval_every: int = Field(25, ge=1)
    checkpoint_every: int = Field(50, ge=1)
    num_workers: int = Field(1, ge=1)
    use_gpu: bool | None = None
    max_failures: int = Field(1, ge=0)
    seed: int = 0

    # the comparisons enter the key as a digest of the versions trained on, whichever way the version was named
    not_in_key: ClassVar[frozenset[str]] = frozenset({"checkpoint_every", "max_failures", "version"})


class PPOParams(Params):
    prompts: str = Field("verifiable", description="'verifiable' (training-side built-in prompts), 'reviews' (review "
                         "openings from the training sentences) or a jsonl/parquet file with a prompt field")
    n_prompts: int = Field(512, ge=1, description="how many prompts to draw rollouts from")
    total_episodes: int = Field(256_000, ge=1, description="prompts answered over the run (InstructGPT: 256k)")
    batch_size: int = Field(512, ge=1, description="episodes per rollout batch (InstructGPT C.4: 512)")
    mini_batches: int = Field(8, ge=1, description="minibatch updates per PPO epoch (C.4: 512 / 64)")
    ppo_epochs: int = Field(1, ge=1, description="passes over each batch (C.4: 1)")
    learning_rate: float = Field(9e-6, gt=0, description="tiny models want ~1e-4")
    beta: float = Field(0.02, gt=0, description="KL coefficient (InstructGPT: 0.02)")
    kl_target: float | None = Field(None, gt=0, description="set to adapt beta toward this KL (Ziegler et al.)")
    kl_horizon: int = Field(10_000, ge=1, description="the adaptive controller's horizon in episodes (Ziegler et al.: "
                            "10,000; a run of a few thousand episodes needs a few hundred to move beta at all)")
    warmup_iterations: int = Field(10, ge=0, description="rollout batches over which the learning rate warms up "
                                   "from a tenth (InstructGPT C.4: 10)")
    ptx_coef: float = Field(0.0, ge=0, description="PPO-ptx pretraining-loss coefficient (InstructGPT: 27.8); 0 = plain PPO")
    ema_decay: float | None = Field(None, gt=0, lt=1, description="EMA of policy weights (InstructGPT: 0.992)")
    max_new_tokens: int = Field(32, ge=1)
    temperature: float = Field(1.0, gt=0)
    missing_end_penalty: float | None = Field(1.0, ge=0, description="subtracted from the score of a response that never stops")
    value_coef: float = Field(0.1, ge=0)
    require_useful_reward: bool = Field(True, description="skip PPO (saying so) when the reward model's held-out "
                                        "accuracy is not above chance: PPO would only chase the RM's noise")
    checkpoint_every: int = Field(5, ge=1, description="rollout batches between resumable checkpoints")
    num_workers: int = Field(1, ge=1)
    use_gpu: bool | None = None
    max_failures: int = Field(1, ge=0)
    seed: int = 0

    not_in_key: ClassVar[frozenset[str]] = frozenset({"checkpoint_every", "max_failures", "require_useful_reward"})

    def load_prompts(self, exclude: set[str] = frozenset()) -> list[str]:
        """The rollout prompts: training-side verifiable prompts (never the held-out ones), or a file's."""
        if self.prompts == "verifiable":
            from tasks.demonstrations import verifiable_demonstrations

            drawn = verifiable_demonstrations(self.n_prompts, 1, seed=self.seed + 1).train
            return [d.prompt for d in drawn if d.prompt not in exclude]
        if self.prompts == "reviews":
            from tasks.reviews import review_prompts

            return review_prompts("train", self.n_prompts)
        return SampleParams(prompts=self.prompts, n_prompts=self.n_prompts).load_prompts()


class JudgeParams(Params):
    prompts: str = Field("verifiable", description="'verifiable' (held-out prompts never ranked), 'reviews' (openings "
                         "of the held-out test sentences) or a jsonl/parquet file")
    n_prompts: int = Field(64, ge=1)
    judge: Literal["gold", "reward"] = Field("gold", description="'gold': the simulated labeler's hidden preference; 'reward': the reward model")
    temperature: float = Field(1.0, ge=0, description="decoding of the compared responses (1 = the distribution PPO "
                               "trains; 0 = greedy; greedy answers are judged too either way)")
    max_new_tokens: int = Field(32, ge=1)
    kl_samples: int = Field(1, ge=1, description="samples per prompt (temperature 1) for the KL to SFT")
    best_of_k: int | None = Field(8, ge=2, description="also judge best-of-K sampling from SFT picked by the reward "
                                  "model (is the RM useful at all?); None: skip")
    seed: int = 0
