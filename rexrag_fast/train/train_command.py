"""`rexrag-fast train --config FILE [--print-config] [key=value ...]`: the REX-RAG RL run of `trainer.RLTrainer`.

One process, or one per GPU / CPU rank under a launcher (every rank runs the same command):

    rexrag-fast train --config configs/tiny_cpu.yaml trainer.max_steps=3
    torchrun --nproc_per_node=8 -m rexrag_fast.cli train --config configs/qwen2.5-3b.yaml
    deepspeed --hostfile hostfile --module rexrag_fast.cli train --config configs/qwen2.5-3b.yaml
    srun --ntasks=16 python -m rexrag_fast.cli train ...      (MASTER_ADDR exported by the job script)

Overrides take our keys or verl / REX-RAG's (`actor_rollout_ref.actor.optim.lr=1e-6`, `trainer.save_freq=50`,
Hydra's `+key=value`), translated by `config_keys.py`. `--print-config` prints the resolved config and exits
without loading anything. Otherwise, before anything heavy starts, the config is validated (every problem
listed with its key path; data files and the output directory are checked on disk), model.path is resolved
and its architecture checked, and a configured retrieval server gets one query; any failure ends the command
at once with exit status 2 and a message naming the key.

A run restarted into the same trainer.output_dir continues from its newest good checkpoint
(trainer.resume_mode: auto, as verl) and appends to its metrics.jsonl.
"""

from __future__ import annotations

import argparse
import sys

from rexrag_fast.train.config import ConfigError, dump_config, load_config


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", required=True, help="YAML config (e.g. configs/tiny_cpu.yaml)")
    parser.add_argument("--resume", action="store_true",
                        help="continue from the newest good checkpoint in trainer.output_dir (the default, "
                             "trainer.resume_mode=auto; kept for older command lines)")
    parser.add_argument("--print-config", action="store_true",
                        help="print the resolved config (after translation and overrides) and exit")
    parser.add_argument("overrides", nargs="*", metavar="key=value",
                        help="dotted config overrides, ours or verl's, e.g. trainer.max_steps=10 "
                             "actor_rollout_ref.actor.optim.lr=1e-6")


def _fail(msg: object) -> int:
    print(f"rexrag-fast train: {msg}", file=sys.stderr)
    return 2


def run(args: argparse.Namespace) -> int:
    notes: list[str] = []
    try:
        # --print-config only reads: data files and the output directory may live on another machine.
        cfg = load_config(args.config, args.overrides, paths=not args.print_config, notes=notes)
    except (ConfigError, FileNotFoundError) as e:
        return _fail(e)
    if args.resume:
        cfg.trainer.resume_mode = "auto" if cfg.trainer.resume_mode == "disable" else cfg.trainer.resume_mode
    if args.print_config:
        sys.stdout.write(dump_config(cfg))
        return 0

    from rexrag_fast.retrieval.retriever import RetrieverUnavailableError, check_retriever
    from rexrag_fast.train.metrics import check_backends
    from rexrag_fast.train.models import ModelSpecError, check_model_spec

    try:
        check_model_spec(cfg.model.path, trust_remote_code=cfg.model.trust_remote_code)
        check_backends(cfg.trainer.logger)
    except (ModelSpecError, ImportError) as e:
        return _fail(e)
    if not cfg.retriever.embedded:
        try:
            check_retriever(cfg.retriever.url, cfg.retriever.timeout_s)
        except RetrieverUnavailableError as e:
            return _fail(e)

    from rexrag_fast.train import distributed as du
    from rexrag_fast.train.trainer import RLTrainer

    du.init_distributed()
    try:
        if du.is_main():
            for note in notes:
                print(f"config: {note}", flush=True)
        trainer = RLTrainer(cfg)
        state = trainer.train()
        if du.is_main():
            print(f"finished at step {state.step}; output in {cfg.trainer.output_dir}", flush=True)
    finally:
        du.destroy_process_group()
    return 0
