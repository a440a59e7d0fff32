"""`rexrag-fast bench`: runs bench/throughput.py from a source checkout."""

from __future__ import annotations

import argparse
import runpy
import sys
from pathlib import Path


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("rest", nargs=argparse.REMAINDER, help="arguments for bench/throughput.py")


def run(args: argparse.Namespace) -> int:
    script = Path(__file__).resolve().parent.parent / "bench" / "throughput.py"
    if not script.exists():
        print(f"rexrag-fast bench needs a source checkout: {script} not found", file=sys.stderr)
        return 2
    sys.argv = [str(script), *args.rest]
    try:
        runpy.run_path(str(script), run_name="__main__")
    except SystemExit as e:
        return int(e.code or 0)
    return 0
