"""Real DeepSpeed ZeRO-3 checkpoints on CPU ranks, launched by tests/test_checkpoint_engine.py:

    DS_ACCELERATOR=cpu torchrun --nproc_per_node=2 tests/dist_scripts/checkpoint_engine.py save --out DIR
    DS_ACCELERATOR=cpu torchrun --nproc_per_node=2 tests/dist_scripts/checkpoint_engine.py load --out DIR \
        --roots ROOT...

save: a tiny Qwen2 under ZeRO-3 takes --steps optimizer steps on a fixed batch; after each it is saved to
DIR/hashed (default options: every file hashed) and DIR/sized (hash_engine_files=False), and its gathered weights go to
DIR/weights_step{k}.pt. Every os.fsync call is recorded to DIR/fsync_rank{r}.jsonl (path, order).
load: for each ROOT, `load_checkpoint(ROOT, engine)` on a fresh engine; DIR/loaded.json gets, per ROOT, the
step loaded (or null) and the skip messages, and DIR/loaded_{i}.pt the gathered weights after loading.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import torch

from rexrag_fast.engine.loaders import tiny_model
from rexrag_fast.train import checkpoint
from rexrag_fast.train import distributed as du
from rexrag_fast.train.actor import build_deepspeed_config
from rexrag_fast.train.checkpoint import TrainerState, load_checkpoint, save_checkpoint
from rexrag_fast.train.config import load_config

VOCAB = 96


def build_engine():
    import deepspeed

    cfg = load_config(None, ["deepspeed.zero_stage=3", "deepspeed.precision=fp32", "actor.lr=1e-2",
                             "data.train_batch_size=2", "actor.ppo_mini_batch_size=2"])
    model = tiny_model("qwen2", vocab_size=VOCAB, seed=5, hidden_size=32, intermediate_size=64,
                       max_position_embeddings=64, tie_word_embeddings=False).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.actor.lr)
    engine, *_ = deepspeed.initialize(model=model, optimizer=optimizer,
                                      config=build_deepspeed_config(cfg, torch.device("cpu")))
    return engine


def gathered(engine) -> dict[str, torch.Tensor]:
    import deepspeed

    out = {}
    for name, p in engine.module.named_parameters():
        with deepspeed.zero.GatheredParameters([p]):
            out[name] = p.detach().clone()
    return out


def train_step(engine, step: int) -> None:
    g = torch.Generator().manual_seed(100 + step * 10 + du.get_rank())
    ids = torch.randint(0, VOCAB, (2, 12), generator=g)
    logits = engine(input_ids=ids).logits
    loss = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, VOCAB).float(), ids[:, 1:].reshape(-1))
    engine.backward(loss)
    engine.step()


def record_fsyncs(out: Path) -> None:
    """Wrap os.fsync so that every call appends (path, call number) to out/fsync_rank{r}.jsonl."""
    log = open(out / f"fsync_rank{du.get_rank()}.jsonl", "a")  # noqa: SIM115 (open for the process's life)
    real = os.fsync
    count = [0]

    def fsync(fd: int) -> None:
        real(fd)
        count[0] += 1
        log.write(json.dumps({"path": os.readlink(f"/proc/self/fd/{fd}"), "n": count[0]}) + "\n")
        log.flush()

    checkpoint.os.fsync = fsync  # the module's own reference to os


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("mode", choices=["save", "load"])
    ap.add_argument("--out", required=True)
    ap.add_argument("--steps", type=int, default=2)
    ap.add_argument("--roots", nargs="+", default=[])
    args = ap.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    du.init_distributed()
    rank = du.get_rank()
    engine = build_engine()
    if args.mode == "save":
        record_fsyncs(out)
        timings = {"hashed": [], "sized": []}
        for step in range(1, args.steps + 1):
            train_step(engine, step)
            for kind, options in (("hashed", {}), ("sized", {"hash_engine_files": False})):  # hashed: the default
                t0 = time.perf_counter()
                save_checkpoint(out / kind, TrainerState(step=step, data_position=4 * step), engine, **options)
                timings[kind].append(time.perf_counter() - t0)
            weights = gathered(engine)
            if rank == 0:
                torch.save(weights, out / f"weights_step{step}.pt")
        if rank == 0:
            (out / "save_seconds.json").write_text(json.dumps(timings))
    else:
        results = []
        for i, root in enumerate(args.roots):
            loaded = load_checkpoint(root, engine)
            weights = gathered(engine)
            if rank == 0:
                results.append({"root": root, "step": None if loaded is None else loaded.state.step,
                                "skipped": [] if loaded is None else loaded.skipped})
                torch.save(weights, out / f"loaded_{i}.pt")
        if rank == 0:
            (out / "loaded.json").write_text(json.dumps(results, indent=1))
    du.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
