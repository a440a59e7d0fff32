"""`rexrag-fast export --checkpoint DIR --out HF_DIR`: a saved ZeRO checkpoint as a Hugging Face model directory.

DIR is a checkpoint (`<output_dir>/checkpoints/step_NNNNNN`), or a run's output directory / checkpoints
directory (then its newest good checkpoint). The ZeRO shards are consolidated on the CPU
(DeepSpeed's zero_to_fp32, no process group, no GPU), the architecture and tokenizer come from the run's
model.path recorded in the checkpoint, and the weights are written in the dtype the run trained in (bf16 when
DeepSpeed ran in bf16) unless --dtype says otherwise. The result loads with `from_pretrained` and
`rexrag-fast eval --model HF_DIR`.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

DTYPES = ("auto", "bf16", "fp32")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--checkpoint", required=True,
                        help="a checkpoint step directory, or a run's output / checkpoints directory (newest good)")
    parser.add_argument("--out", required=True, help="the Hugging Face model directory to write")
    parser.add_argument("--dtype", choices=DTYPES, default="auto", help="auto: the dtype the run trained in")


def find_checkpoint(path: Path) -> Path:
    """The checkpoint step directory that `path` names (itself, or the newest good one under it or under
    its checkpoints/); ValueError saying what is wrong otherwise."""
    from rexrag_fast.train.checkpoint import TRAINER_STATE, find_latest_good, verify_checkpoint

    if (path / TRAINER_STATE).is_file():
        problems = verify_checkpoint(path)
        if problems:
            raise ValueError(f"{path} is not a good checkpoint: {'; '.join(problems)}")
        return path
    for root in (path, path / "checkpoints"):
        found, _ = find_latest_good(root)
        if found is not None:
            return found
    raise ValueError(f"{path}: no good checkpoint there (expected step_NNNNNN/ with COMPLETE, or a run's "
                     "output directory)")


def training_dtype(state: dict[str, Any]) -> str:
    """'bf16' when the run's DeepSpeed config had bf16 enabled, else 'fp32'."""
    return "bf16" if state.get("engine_config", {}).get("bf16", {}).get("enabled") else "fp32"


def export_checkpoint(checkpoint: Path, out: Path, dtype: str = "auto") -> Path:
    """Write the checkpoint's consolidated weights as a Hugging Face model directory at `out`."""
    import torch
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    from rexrag_fast.train.checkpoint import ENGINE_DIR, ENGINE_TAG, TRAINER_STATE
    from rexrag_fast.train.models import model_skeleton, write_hf_model

    state = json.loads((checkpoint / TRAINER_STATE).read_text())
    model_cfg = state.get("extra", {}).get("config", {}).get("model")
    if not model_cfg:
        raise ValueError(f"{checkpoint / TRAINER_STATE} records no model config (saved by an older version?)")
    config, tokenizer = model_skeleton(model_cfg["path"], tokenizer_path=model_cfg.get("tokenizer_path"),
                                       trust_remote_code=bool(model_cfg.get("trust_remote_code")))
    weights = get_fp32_state_dict_from_zero_checkpoint(str(checkpoint / ENGINE_DIR), tag=ENGINE_TAG)
    # The actor wraps the model as `.model` (train/actor.py PolicyLogprobs): drop that prefix.
    weights = {k.removeprefix("model."): v for k, v in weights.items()}
    chosen = training_dtype(state) if dtype == "auto" else dtype
    return write_hf_model(config, weights, tokenizer, out, torch.bfloat16 if chosen == "bf16" else torch.float32)


def run(args: argparse.Namespace) -> int:
    try:
        checkpoint = find_checkpoint(Path(args.checkpoint))
        out = export_checkpoint(checkpoint, Path(args.out), args.dtype)
    except (ValueError, RuntimeError, FileNotFoundError) as e:
        print(f"rexrag-fast export: {e}", file=sys.stderr)
        return 2
    print(f"exported {checkpoint} to {out}")
    return 0
