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
    args = parser.parse_args(argv)
    if args.command == "demo":
        from flows.demo import demo as run_demo

        return run_reporting_errors(lambda: run_demo(seconds=args.seconds))
    return 1


if __name__ == "__main__":
    sys.exit(main())
