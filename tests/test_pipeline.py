"""The pipeline for real: Prefect (test harness), a local Ray running Ray Train, MLflow on SQLite, tiny settings.

One session-wide corpus; each test runs the `pipeline` flow and checks what MLflow recorded.
"""

from __future__ import annotations

import collections
from pathlib import Path

import pytest

from ray_faults import run_killing_a_worker
from tasks import tracking
from tasks.params import IngestParams, PretrainParams, TokenizerParams
from tasks.settings import state_dir

TOKENIZER = TokenizerParams(vocab_size=512)
TINY = PretrainParams(n_layer=1, n_head=2, n_embd=32, block_size=64, max_steps=40, batch_size=4,
                      warmup_steps=5, eval_every=20, checkpoint_every=10)


@pytest.fixture(scope="module")
def prefect_api():
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=120):
        yield
    import ray

    ray.shutdown()


@pytest.fixture(scope="module")
def corpus(tiny_shakespeare: Path, tmp_path_factory) -> Path:
    """Real text in three files (TinyShakespeare's first 300 kB), as a directory source."""
    text = tiny_shakespeare.read_text(encoding="utf-8")[:300_000]
    folder = tmp_path_factory.mktemp("corpus")
    for n in range(3):
        (folder / f"part{n}.txt").write_text(text[n * 100_000:(n + 1) * 100_000])
    return folder


def corpus_ingest(corpus: Path) -> IngestParams:
    # Splits follow a hash of each document's source path, and the corpus sits in a fresh temp dir each
    # session: with ~30 documents, a 30% share makes an empty split (0.7**30, about 2e-5) practically impossible.
    return IngestParams(sources=[str(corpus)], min_chars=50, val_fraction=0.3)


def stage_runs(stage: str):
    return tracking.client().search_runs([tracking.experiment_id()], f"tags.`{tracking.STAGE_TAG}` = '{stage}'")


def metric_steps(run_id: str, key: str) -> list[int]:
    return [m.step for m in tracking.client().get_metric_history(run_id, key)]


def test_pipeline_runs_every_stage_then_reuses_them(prefect_api, corpus):
    from flows.pipeline import pipeline

    ingest = corpus_ingest(corpus)
    first = pipeline(ingest, TOKENIZER, TINY)
    assert Path(first["checkpoint"], "model.pt").is_file()

    client = tracking.client()
    parent = client.get_run(first["mlflow_run_id"])
    assert parent.info.status == "FINISHED"
    runs = {stage: stage_runs(stage) for stage in ("ingest", "tokenizer", "pretrain")}
    assert all(len(r) == 1 for r in runs.values()), runs
    for stage_run in (r[0] for r in runs.values()):
        assert stage_run.data.tags[tracking.PARENT_TAG] == parent.info.run_id
        assert stage_run.info.status == "FINISHED"
    pretrain_run = runs["pretrain"][0]
    steps = metric_steps(pretrain_run.info.run_id, "pretrain/loss")
    assert steps == sorted(set(steps)) and steps[0] == 1 and steps[-1] == TINY.max_steps
    val = client.get_metric_history(pretrain_run.info.run_id, "pretrain/val_loss")
    assert [m.step for m in val] == [20, 40]
    losses = {m.step: m.value for m in client.get_metric_history(pretrain_run.info.run_id, "pretrain/loss")}
    assert losses[TINY.max_steps] < losses[1]  # it learned something
    artifacts = {a.path for a in client.list_artifacts(pretrain_run.info.run_id)}
    assert {"samples.txt", "model_config.json"} <= artifacts
    assert client.search_model_versions("name='pretrain'")  # registered
    assert parent.data.tags["mlflow.source.git.commit"] == pretrain_run.data.tags["mlflow.source.git.commit"]
    assert len(parent.data.tags["mlflow.source.git.commit"]) == 40

    # its report card: report.md with the run's figures and the pretraining curve, logged on the pipeline run
    from tasks.report_card import write_report_card

    card = write_report_card(corpus.parent / "card", title="test card", summary="pretrain: it learned",
                             run_ids=[parent.info.run_id], log_on=parent.info.run_id,
                             timings={"pretrain": 1.0}, wall_s=2.0)
    text = card.read_text()
    assert "pretrain: it learned" in text and "| pretrain | 1 |" in text and "![pretrain_loss](pretrain_loss.png)" in text
    assert {"report/report.md", "report/pretrain_loss.png"} <= {
        a.path for a in client.list_artifacts(parent.info.run_id, "report")}

    second = pipeline(ingest, TOKENIZER, TINY)
    assert second["checkpoint"] == first["checkpoint"]
    tags = client.get_run(second["mlflow_run_id"]).data.tags
    for stage in ("ingest", "tokenizer", "pretrain"):
        assert tags[f"instructflow.reused.{stage}"] == runs[stage][0].info.run_id
        assert len(stage_runs(stage)) == 1  # nothing recomputed


def test_killed_worker_then_rerun_resumes_from_the_last_checkpoint(prefect_api, corpus):
    from flows.pipeline import pipeline

    ingest = corpus_ingest(corpus)
    params = TINY.model_copy(update={"max_steps": 800, "checkpoint_every": 25, "eval_every": 500, "max_failures": 0})
    # the flow must fail: its only worker is killed and no restart is allowed
    killed, failures = run_killing_a_worker(lambda: pipeline(ingest, TOKENIZER, params), "pretrain")
    assert killed is not None and failures, "the worker was not killed mid-run"

    result = pipeline(ingest, TOKENIZER, params)  # the re-run: same inputs and config
    tags = tracking.client().get_run(result["mlflow_run_id"]).data.tags
    assert "instructflow.reused.ingest" in tags and "instructflow.reused.tokenizer" in tags
    pretrain_runs = [r for r in stage_runs("pretrain") if r.data.params.get("max_steps") == "800"]
    assert len(pretrain_runs) == 1  # the failed run was continued, not duplicated
    run_id = pretrain_runs[0].info.run_id
    resumed = tracking.client().get_metric_history(run_id, "pretrain/resumed_from")
    assert resumed and resumed[0].value >= 25  # not from step 0
    steps = metric_steps(run_id, "pretrain/loss")
    counts = collections.Counter(steps)
    assert max(counts.values()) == 1, "a step was logged twice"
    assert steps[-1] == 800 and steps == sorted(steps)


def test_corpus_smaller_than_a_window_is_a_clear_error_before_training(prefect_api, tmp_path):
    from flows.pipeline import pipeline
    from model.errors import InstructflowError

    for n in range(20):  # twenty short documents: both splits get some, none is long
        (tmp_path / f"short{n}.txt").write_text(f"Document {n} has only a few words, far too few to train on. ")
    before = set((state_dir() / "stages").glob("pretrain/*"))
    with pytest.raises(InstructflowError, match="fewer than one training window"):
        pipeline(IngestParams(sources=[str(tmp_path)], min_chars=10, val_fraction=0.5), TOKENIZER,
                 TINY.model_copy(update={"block_size": 256}))
    assert set((state_dir() / "stages").glob("pretrain/*")) == before  # nothing started, nothing half-written


def test_parallel_tokenisation_on_ray_gives_the_same_tokens(prefect_api, tiny_shakespeare):
    from model.tokenizer import Tokenizer
    from tasks.tokenize_corpus import encode_documents, encode_in_parallel

    texts = tiny_shakespeare.read_text(encoding="utf-8")[:200_000].split("\n\n")
    tokenizer = Tokenizer.train(texts, vocab_size=400)
    assert encode_in_parallel(tokenizer, texts, chunks=3) == encode_documents(tokenizer, texts)


def test_finetune_and_evaluate_stages_after_pretraining(prefect_api, corpus, tmp_path):
    """GPT-1 fine-tuning on the real sentiment set (a slice) and zero/one-shot evaluation, through the pipeline."""
    import json

    from flows.pipeline import pipeline
    from model.errors import InstructflowError
    from tasks.params import EvaluateParams, FinetuneParams, TaskParams

    choice = tmp_path / "choice.jsonl"  # a user's own multiple-choice file
    choice.write_text("".join(json.dumps({"question": f"Which is {w}?", "options": [w, "none"], "label": 0}) + "\n"
                              for w in ["red", "blue", "green", "gold", "grey", "pink", "teal", "navy"] * 3))
    tasks = [TaskParams(name="sentiment"), TaskParams(name=str(choice), kind="multiple_choice",
                                                      text_fields=["question"], test_fraction=0.3)]
    finetune = FinetuneParams(max_train_examples=64, epochs=1, batch_size=16, learning_rate=1e-3, eval_every=2)
    ingest = corpus_ingest(corpus)
    result = pipeline(ingest, TOKENIZER, TINY, finetune_tasks=tasks[:1], finetune_params=finetune,
                      evaluate_tasks=tasks[1:], evaluate_params=EvaluateParams(shots=[0, 1], max_examples=10))

    client = tracking.client()
    (run,) = stage_runs("finetune")
    assert run.info.status == "FINISHED" and run.data.tags[tracking.PARENT_TAG] == result["mlflow_run_id"]
    metrics = run.data.metrics
    assert 0 <= metrics["finetune/test_accuracy"] <= 1 and metrics["finetune/chance"] == 0.5
    assert metrics["finetune/train_examples"] == 64 and metrics["finetune/steps"] == 4
    assert metric_steps(run.info.run_id, "finetune/val_accuracy") == [2, 4]
    assert Path(result["finetuned"]["sentiment"], "task.json").is_file()

    (evaluation,) = stage_runs("evaluate")
    results = json.loads(Path(result["evaluation"]).read_text())
    assert set(results) == {"choice/k0", "choice/k1"} and not any(r["partial"] for r in results.values())
    assert results["choice/k0"]["examples"] >= 1 and results["choice/k1"]["mean_k"] == 1
    assert results["choice/k0"]["chance"] == 0.5
    accuracy = client.get_metric_history(evaluation.info.run_id, "eval/choice/accuracy_mean")
    assert sorted(m.step for m in accuracy) == [0, 1]  # plotted against K

    # K that cannot fit the 64-token context: refused before any work, naming the task and what fits...
    before = len(stage_runs("evaluate"))
    with pytest.raises(InstructflowError, match=r"too many demonstrations .* sentiment: K=\[40\] \(about \d+ fit\)"):
        pipeline(ingest, TOKENIZER, TINY, evaluate_tasks=tasks, evaluate_params=EvaluateParams(shots=[0, 40], max_examples=5))
    # ...or, for a sweep over K, skipped and reported while the K values that fit are scored
    pipeline(ingest, TOKENIZER, TINY, evaluate_tasks=tasks,
             evaluate_params=EvaluateParams(shots=[0, 40], max_examples=5, skip_unfit=True))
    runs = stage_runs("evaluate")
    assert len(runs) == before + 2 and "FAILED" in {r.info.status for r in runs}
    (latest,) = [r for r in runs if r.info.status == "FINISHED" and r.data.params.get("skip_unfit") == "True"]
    results = json.loads(Path(latest.data.tags[tracking.OUTPUT_TAG]).read_text())
    assert results["sentiment/k0"]["examples"] == 5 and "does not fit" in results["sentiment/k40"]["skipped"]


def test_evaluate_a_registered_model_by_its_registry_uri(prefect_api, corpus, tmp_path):
    import json

    from flows.pipeline import pipeline
    from flows.stages import evaluate_flow
    from model.errors import InstructflowError
    from tasks.params import EvaluateParams, TaskParams

    pipeline(corpus_ingest(corpus), TOKENIZER, TINY)  # reused: makes sure a pretrained model is registered
    choice = tmp_path / "choice.jsonl"
    choice.write_text("".join(json.dumps({"text": f"{w} is a colour", "options": ["yes", "no"], "label": 0,
                                          "split": split}) + "\n" for w, split in
                              [("red", "train"), ("blue", "train"), ("green", "test"), ("gold", "test")]))
    task = TaskParams(name=str(choice), kind="multiple_choice")
    results = json.loads(Path(evaluate_flow("models:/pretrain/latest", None, [task], EvaluateParams(shots=[0, 1]))).read_text())
    assert results["choice/k1"]["examples"] == 2 and results["choice/k1"]["mean_k"] == 1
    assert list((state_dir() / "registry" / "pretrain").glob("*/artifacts/checkpoint/model.pt"))
    with pytest.raises(InstructflowError, match="no registered model models:/nothing@champion"):
        evaluate_flow("models:/nothing@champion", None, [task])


def test_sft_then_sampling_k_responses(prefect_api, corpus):
    """InstructGPT step 1 on the built-in verifiable demonstrations, then K responses per held-out prompt."""
    import pandas as pd

    from flows.pipeline import pipeline
    from tasks.params import DemonstrationParams, SampleParams, SFTParams
    from tasks.stages import sample, sft

    result = pipeline(corpus_ingest(corpus), TOKENIZER, TINY)  # reused
    demos = DemonstrationParams(n_train=48, n_test=12)
    params = SFTParams(learning_rate=3e-3, batch_size=8, seq_len=64, epochs=2, eval_every=2)
    checkpoint = sft(result["checkpoint"], result["tokenizer"], demos, params)
    (run,) = stage_runs("sft")
    metrics = run.data.metrics
    assert run.info.status == "FINISHED" and Path(checkpoint, "model.pt").is_file()
    val = tracking.client().get_metric_history(run.info.run_id, "sft/val_loss")
    best = min(val, key=lambda m: m.value)
    assert metrics["sft/best_step"] == best.step and metrics["sft/best_val_loss"] == pytest.approx(best.value)
    assert val[0].step == 0  # the pretrained model's own loss is the baseline
    assert tracking.client().search_model_versions("name='sft'")

    samples = sample("models:/sft/latest", None, SampleParams(n_prompts=3, k=4, max_new_tokens=8))
    frame = pd.read_parquet(samples)
    assert frame["prompt"].nunique() == 3 and len(frame) <= 12
    assert not frame.duplicated(["prompt", "response"]).any()
    assert set(frame.columns) >= {"prompt", "response", "draw", "seed", "policy"}
    assert frame["policy"].unique().tolist() == ["models:/sft/latest"]
