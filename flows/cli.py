"""The `instructflow` command: runs a stage or the demo and prints user errors as one line, without a traceback."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable

from model.errors import InstructflowError


def run_reporting_errors(entry: Callable[[], object]) -> int:
    """Run `entry`; a mistake the user can fix is printed as `error: ...` with exit status 2."""
    try:
        entry()
    except InstructflowError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="instructflow", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    demo = commands.add_parser("demo", help="train the tiny model on real text for about a minute and print samples")
    demo.add_argument("--seconds", type=float, default=60.0, help="training time budget (default 60)")
    sample = commands.add_parser("sample", help="continue a prompt with a trained checkpoint")
    sample.add_argument("prompt", help="text to continue")
    sample.add_argument("--checkpoint", default=None, help="checkpoint directory (default: the demo's)")
    sample.add_argument("--tokenizer", default=None, help="tokenizer.json (default: the demo's)")
    sample.add_argument("--max-new-tokens", type=int, default=100)
    sample.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    if args.command == "demo":
        from flows.demo import demo as run_demo

        return run_reporting_errors(lambda: run_demo(seconds=args.seconds))
    if args.command == "sample":
        return run_reporting_errors(lambda: _sample(args))
    return 1


def _sample(args: argparse.Namespace) -> None:
    from pathlib import Path

    from model.tokenizer import Tokenizer
    from tasks.pretrain import sample_texts
    from tasks.settings import state_dir

    checkpoint = Path(args.checkpoint) if args.checkpoint else state_dir() / "demo" / "checkpoint"
    tokenizer = Tokenizer.load(Path(args.tokenizer) if args.tokenizer else state_dir() / "demo" / "tokenizer.json")
    print(sample_texts(checkpoint, tokenizer, [args.prompt], args.max_new_tokens, seed=args.seed)[0])


if __name__ == "__main__":
    sys.exit(main())
