"""The papers' comparisons in one flow: what pretraining buys GPT-1, and how GPT-2/3 behave with K examples.

pretrain (keeping snapshots) -> fine-tune variants (pretrained / from scratch / without the auxiliary LM loss /
with 0..L-1 blocks transferred) -> zero-shot on every snapshot -> zero/one/few-shot on the final model ->
one report (tables + plots) in the comparison's MLflow run. Every stage is cached, so a re-run after a
failure only does what is missing.
"""

from __future__ import annotations

from pathlib import Path

from prefect import flow

from tasks.compare import log_report, pretrain_snapshots
from tasks.params import EvaluateParams, FinetuneParams, IngestParams, PretrainParams, TaskParams, TokenizerParams
from tasks.settings import stage_dir
from tasks.stages import evaluate, finetune, ingest, pipeline_run, pretrain, read_model_config, tokenize

DEFAULT_EVAL_TASKS = [TaskParams(name=n) for n in ("sentiment", "quartz", "mmlu", "entailment")]


@flow(name="compare", log_prints=True)
def compare(
    ingest_params: IngestParams = IngestParams(),
    tokenizer_params: TokenizerParams = TokenizerParams(),
    pretrain_params: PretrainParams = PretrainParams(preset="tiny", max_steps=600, batch_size=8, seq_len=128,
                                                     eval_every=200, checkpoint_every=100),
    finetune_task: TaskParams = TaskParams(name="sentiment"),
    finetune_params: FinetuneParams = FinetuneParams(),
    evaluate_tasks: list[TaskParams] = DEFAULT_EVAL_TASKS,
    evaluate_params: EvaluateParams = EvaluateParams(shots=[0, 1, 4], skip_unfit=True),
    seeds: list[int] = [0, 1, 2],  # noqa: B006 (pydantic copies defaults)
) -> str:
    """Run every comparison and return the report's URI (report.md; the MLflow run holds it with the plots)."""
    params = {"ingest": ingest_params.model_dump(), "tokenizer": tokenizer_params.model_dump(),
              "pretrain": pretrain_params.model_dump(), "finetune_task": finetune_task.model_dump(),
              "finetune": finetune_params.model_dump(), "evaluate_tasks": [t.model_dump() for t in evaluate_tasks],
              "evaluate": evaluate_params.model_dump(), "seeds": seeds}
    with pipeline_run("compare", params) as run_id:
        dataset = ingest(ingest_params, run_id)
        tokens = tokenize(dataset, tokenizer_params, run_id)
        checkpoint = pretrain(tokens, pretrain_params.model_copy(update={"snapshots": True}), run_id)
        tokenizer = str(Path(tokens).parent / "tokenizer.json")

        # GPT-1 Table 5: the same data, with and without pretraining and the auxiliary objective, over several seeds
        # (the fine-tuning seed sets the head's initialisation and the example order)
        variants = {"pretrained, λ=0.5": finetune_params.model_copy(update={"lm_weight": 0.5}),
                    "scratch, λ=0.5": finetune_params.model_copy(update={"init": "scratch", "lm_weight": 0.5}),
                    "pretrained, λ=0": finetune_params.model_copy(update={"lm_weight": 0.0})}
        finetuned = {name: [finetune(checkpoint, tokenizer, finetune_task, p.model_copy(update={"seed": seed}), run_id)
                            for seed in seeds] for name, p in variants.items()}
        # GPT-1 Figure 2 (left): embeddings + the first n blocks; n = all is the pretrained run above
        n_layer = read_model_config(checkpoint).n_layer
        transfer = {n: finetune(checkpoint, tokenizer, finetune_task, finetune_params.model_copy(
                                update={"transfer_layers": n, "lm_weight": 0.5, "seed": seeds[0]}), run_id)
                    for n in range(n_layer)}
        transfer[n_layer] = finetuned["pretrained, λ=0.5"][0]
        # GPT-1 Figure 2 (right): zero-shot behaviour as pretraining goes on
        zero = evaluate_params.model_copy(update={"shots": [0]})
        zero_shot = {step: evaluate(snapshot, tokenizer, evaluate_tasks, zero, run_id)
                     for step, snapshot in pretrain_snapshots(checkpoint)}
        # GPT-2 zero-shot and GPT-3 one/few-shot on the final model
        # a sweep over K: the K values a task's examples cannot fit are reported as such, not fatal
        fewshot = evaluate(checkpoint, tokenizer, evaluate_tasks, evaluate_params.model_copy(update={"skip_unfit": True}),
                           run_id)
        report = log_report(run_id, stage_dir("compare", run_id), finetuned, transfer, zero_shot, fewshot)
    print(report.read_text())
    return str(report)


if __name__ == "__main__":
    compare()
