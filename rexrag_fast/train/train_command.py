"""`rexrag-fast train --config FILE [--resume] [key=value ...]`: the REX-RAG RL run of `trainer.RLTrainer`.

One process, or one per GPU / CPU rank under a launcher (every rank runs the same command):

    rexrag-fast train --config configs/tiny_cpu.yaml trainer.max_steps=3
    torchrun --nproc_per_node=8 -m rexrag_fast.cli train --config configs/qwen2.5-3b.yaml
    deepspeed --hostfile hostfile --module rexrag_fast.cli train --config configs/qwen2.5-3b.yaml

Before anything heavy starts, the config is validated (every problem listed with its key path; data files
and the output directory are checked on disk) and a
configured retrieval server gets one query; an unreachable server ends the command at once with exit
status 2 and a message naming retriever.url.
"""

from __future__ import annotations

import argparse
import sys

from rexrag_fast.train.config import ConfigError, load_config


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", required=True, help="YAML config (e.g. configs/tiny_cpu.yaml)")
    parser.add_argument("--resume", action="store_true",
                        help="continue from the newest good checkpoint in trainer.output_dir")
    parser.add_argument("overrides", nargs="*", metavar="key=value",
                        help="dotted config overrides, e.g. trainer.max_steps=10 algorithm.name=grpo")


def run(args: argparse.Namespace) -> int:
    from rexrag_fast.retrieval.retriever import RetrieverUnavailableError, check_retriever

    try:
        cfg = load_config(args.config, args.overrides, paths=True)
    except (ConfigError, FileNotFoundError) as e:
        print(f"rexrag-fast train: {e}", file=sys.stderr)
        return 2
    if args.resume:
        cfg.trainer.resume = True
    if not cfg.retriever.embedded:
        try:
            check_retriever(cfg.retriever.url, cfg.retriever.timeout_s)
        except RetrieverUnavailableError as e:
            print(f"rexrag-fast train: {e}", file=sys.stderr)
            return 2

    from rexrag_fast.train import distributed as du
    from rexrag_fast.train.trainer import RLTrainer

    du.init_distributed()
    try:
        trainer = RLTrainer(cfg)
        state = trainer.train()
        if du.is_main():
            print(f"finished at step {state.step}; output in {cfg.trainer.output_dir}", flush=True)
    finally:
        du.destroy_process_group()
    return 0
