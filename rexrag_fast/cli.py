"""`rexrag-fast` command line: one subcommand per job, each defined next to the code it drives.

A subcommand module exposes `add_arguments(parser)` and `run(args) -> int`; it is imported only when
that subcommand runs, so `rexrag-fast --help` stays fast.

Launchers add their own argument: `deepspeed` (and torch's older `torch.distributed.launch`) pass
`--local_rank=N` (or `--local-rank N`) before the subcommand's arguments. It is taken out wherever it appears
and exported as LOCAL_RANK (unless the launcher set that too), which is where `train.distributed` reads it.
"""

from __future__ import annotations

import argparse
import importlib
import os
import re
import sys

# name -> (module, one-line help)
COMMANDS: dict[str, tuple[str, str]] = {
    "bench": ("rexrag_fast.bench_command", "run bench/throughput.py (tokens/s per stage)"),
    "index": ("rexrag_fast.retrieval.index_command", "embed a corpus JSONL into a faiss index directory"),
    "serve": ("rexrag_fast.retrieval.serve_command", "serve an index over HTTP (Search-R1 POST /retrieve)"),
    "eval": ("rexrag_fast.agent.eval_command", "EM/F1 of the search agent per data_source on QA files"),
    "train": ("rexrag_fast.train.train_command", "REX-RAG / GRPO RL training on DeepSpeed ZeRO-3 from a YAML config"),
    "export": ("rexrag_fast.train.export_command", "a saved ZeRO checkpoint as a Hugging Face model directory"),
    "demo": ("rexrag_fast.train.demo_command", "embedded CPU demo: warm start, then GRPO vs REX-RAG, table and plots"),
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="rexrag-fast", description="Fast REX-RAG training engine.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, (_module, help_text) in COMMANDS.items():
        sub.add_parser(name, help=help_text)
    return parser


_LOCAL_RANK_FLAGS = ("--local_rank", "--local-rank")


def strip_launcher_args(argv: list[str]) -> tuple[list[str], int | None]:
    """(argv without any `--local_rank=N` / `--local_rank N` / `--local-rank...`, N or None). A malformed
    value exits with status 2 and a message naming it."""
    out: list[str] = []
    local_rank: int | None = None
    i = 0
    while i < len(argv):
        arg = argv[i]
        flag, sep, value = arg.partition("=")
        if flag in _LOCAL_RANK_FLAGS:
            if not sep:
                value = argv[i + 1] if i + 1 < len(argv) else ""
                i += 1
            if not re.fullmatch(r"\d+", value):
                print(f"rexrag-fast: {flag}: expected a non-negative integer, got {value!r}", file=sys.stderr)
                raise SystemExit(2)
            local_rank = int(value)
        else:
            out.append(arg)
        i += 1
    return out, local_rank


def main(argv: list[str] | None = None) -> int:
    argv, local_rank = strip_launcher_args(list(sys.argv[1:] if argv is None else argv))
    if local_rank is not None:
        os.environ.setdefault("LOCAL_RANK", str(local_rank))
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
