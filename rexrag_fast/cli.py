"""`rexrag-fast` command line: one subcommand per job, each defined next to the code it drives.

A subcommand module exposes `add_arguments(parser)` and `run(args) -> int`; it is imported only when
that subcommand runs, so `rexrag-fast --help` stays fast.
"""

from __future__ import annotations

import argparse
import importlib
import sys

# name -> (module, one-line help)
COMMANDS: dict[str, tuple[str, str]] = {
    "bench": ("rexrag_fast.bench_command", "run bench/throughput.py (tokens/s per stage)"),
    "index": ("rexrag_fast.retrieval.index_command", "embed a corpus JSONL into a faiss index directory"),
    "serve": ("rexrag_fast.retrieval.serve_command", "serve an index over HTTP (Search-R1 POST /retrieve)"),
    "eval": ("rexrag_fast.agent.eval_command", "EM/F1 of the search agent per data_source on QA files"),
    "train": ("rexrag_fast.train.train_command", "REX-RAG / GRPO RL training on DeepSpeed ZeRO-3 from a YAML config"),
    "demo": ("rexrag_fast.train.demo_command", "embedded CPU demo: warm start, then GRPO vs REX-RAG, table and plots"),
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="rexrag-fast", description="Fast REX-RAG training engine.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, (_module, help_text) in COMMANDS.items():
        sub.add_parser(name, help=help_text)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    # Parse the command name first, then let its module define the remaining arguments.
    if not argv or argv[0] in ("-h", "--help") or argv[0] not in COMMANDS:
        parser.parse_args(argv)
        return 2
    name = argv[0]
    module = importlib.import_module(COMMANDS[name][0])
    sub = argparse.ArgumentParser(prog=f"rexrag-fast {name}", description=COMMANDS[name][1])
    module.add_arguments(sub)
    args = sub.parse_args(argv[1:])
    return int(module.run(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
