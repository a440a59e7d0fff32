"""Checkpoints: a DeepSpeed engine checkpoint plus trainer state, written atomically, verified on load.

Layout under `root` (the run's `<output_dir>/checkpoints`):

    step_000050/
      deepspeed/ds/...          engine.save_checkpoint(save_dir=.../deepspeed, tag="ds"): every rank's shards
      trainer_state.json        step, data position, keep-ratio average, engine config, extra (rank 0)
      rng_rank{r}.pt            Python / NumPy / torch (CPU and CUDA) RNG states of rank r
      manifest.json             sha256 and size of every state file, size of every engine file
      COMPLETE                  written last: its absence means the save never finished
    .step_000050.tmp/           a save in progress; renamed to step_000050/ only once COMPLETE is in it

A checkpoint is good when COMPLETE and manifest.json exist, every listed file exists with its size, and
every hashed file's sha256 matches (engine shards are checked by size unless `hash_engine_files` was set:
hashing tens of GB at every save would cost more than it protects). Loading takes the newest good
checkpoint and says, for each newer one it skips, why it was skipped. After each save the newest
`keep_last` good checkpoints stay; older ones and broken ones are deleted.

All ranks call `save_checkpoint` / `load_checkpoint` together (the engine calls inside are collective); the
output directory must be on a file system every rank sees.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import random
import re
import shutil
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from rexrag_fast.train import distributed as dist_utils

log = logging.getLogger(__name__)

COMPLETE = "COMPLETE"
MANIFEST = "manifest.json"
TRAINER_STATE = "trainer_state.json"
ENGINE_DIR = "deepspeed"
ENGINE_TAG = "ds"
_STEP_RE = re.compile(r"^step_(\d{6,})$")


@dataclass
class TrainerState:
    """What the trainer needs besides weights and optimizer to continue exactly."""

    step: int = 0  # optimizer steps completed
    data_position: int = 0  # prompts consumed from the (seeded, shuffled) data stream
    epoch: int = 0
    keep_ratio_ewm: float | None = None  # REX-RAG running average of probe accuracy (None: not started)
    engine_config: dict[str, Any] = field(default_factory=dict)
    extra: dict[str, Any] = field(default_factory=dict)


@dataclass
class LoadedCheckpoint:
    path: Path
    state: TrainerState
    skipped: list[str]  # one message per newer checkpoint that was not usable


def step_dir_name(step: int) -> str:
    return f"step_{step:06d}"


def list_checkpoints(root: str | Path) -> list[tuple[int, Path]]:
    """Finished-or-not checkpoint directories under `root` as (step, path), newest first."""
    root = Path(root)
    if not root.is_dir():
        return []
    found = []
    for p in root.iterdir():
        m = _STEP_RE.match(p.name)
        if m and p.is_dir():
            found.append((int(m.group(1)), p))
    return sorted(found, reverse=True)


# --------------------------------------------------------------------------------------------- RNG


def capture_rng_state() -> dict[str, Any]:
    """This process's Python, NumPy and torch RNG states."""
    state: dict[str, Any] = {
        "python": random.getstate(),
        "numpy": np.random.get_state(),
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng_state(state: dict[str, Any]) -> None:
    """Inverse of `capture_rng_state`."""
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


# ----------------------------------------------------------------------------------------- hashing


def sha256_file(path: Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def _fsync_file(path: Path) -> None:
    with open(path, "rb") as f:
        os.fsync(f.fileno())


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _write_manifest(ckpt: Path, step: int, hash_engine_files: bool) -> None:
    files: dict[str, dict[str, Any]] = {}
    for p in sorted(ckpt.rglob("*")):
        if not p.is_file() or p.name in (MANIFEST, COMPLETE):
            continue
        rel = p.relative_to(ckpt).as_posix()
        is_engine = rel.startswith(ENGINE_DIR + "/")
        entry: dict[str, Any] = {"size": p.stat().st_size}
        if hash_engine_files or not is_engine:
            entry["sha256"] = sha256_file(p)
        files[rel] = entry
    manifest = {"format": 1, "step": step, "created": time.time(), "files": files}
    (ckpt / MANIFEST).write_text(json.dumps(manifest, indent=1, sort_keys=True))
    _fsync_file(ckpt / MANIFEST)


def verify_checkpoint(path: str | Path) -> list[str]:
    """Problems that make the checkpoint at `path` unusable; empty when it is good."""
    path = Path(path)
    if not (path / COMPLETE).is_file():
        return [f"no {COMPLETE} marker (the save did not finish)"]
    try:
        manifest = json.loads((path / MANIFEST).read_text())
        files = manifest["files"]
    except FileNotFoundError:
        return [f"no {MANIFEST}"]
    except (OSError, ValueError, KeyError, TypeError) as e:
        return [f"{MANIFEST} is unreadable: {e}"]
    problems = []
    if TRAINER_STATE not in files:
        problems.append(f"{MANIFEST} lists no {TRAINER_STATE}")
    for rel, entry in files.items():
        p = path / rel
        if not p.is_file():
            problems.append(f"{rel} is missing")
            continue
        size = p.stat().st_size
        if size != entry.get("size"):
            problems.append(f"{rel} has {size} bytes, the manifest says {entry.get('size')}")
            continue
        if "sha256" in entry and sha256_file(p) != entry["sha256"]:
            problems.append(f"{rel} fails its sha256 check")
    return problems


# ------------------------------------------------------------------------------------------- save


def save_checkpoint(
    root: str | Path,
    state: TrainerState,
    engine: Any | None = None,
    *,
    keep_last: int = 3,
    hash_engine_files: bool = False,
) -> Path:
    """Write checkpoint `step_{state.step}` under `root` atomically; call on every rank together.

    engine: a DeepSpeed engine (its `save_checkpoint` is collective) or None for trainer state only.
    Returns the final checkpoint directory. Older checkpoints beyond `keep_last` good ones are deleted.
    """
    if keep_last < 1:
        raise ValueError(f"keep_last: expected >= 1, got {keep_last}")
    root = Path(root)
    rank = dist_utils.get_rank()
    name = step_dir_name(state.step)
    final = root / name
    tmp = root / f".{name}.tmp"
    if rank == 0:
        root.mkdir(parents=True, exist_ok=True)
        if tmp.exists():  # a save of this step that died half way
            shutil.rmtree(tmp)
        tmp.mkdir()
    dist_utils.barrier()

    if engine is not None:
        engine.save_checkpoint(str(tmp / ENGINE_DIR), tag=ENGINE_TAG, save_latest=False)
    torch.save(capture_rng_state(), tmp / f"rng_rank{rank}.pt")
    _fsync_file(tmp / f"rng_rank{rank}.pt")
    dist_utils.barrier()

    if rank == 0:
        (tmp / TRAINER_STATE).write_text(json.dumps(asdict(state), indent=1, sort_keys=True, default=str))
        _fsync_file(tmp / TRAINER_STATE)
        _write_manifest(tmp, state.step, hash_engine_files)
        (tmp / COMPLETE).write_text(f"{state.step}\n")
        _fsync_file(tmp / COMPLETE)
        _fsync_dir(tmp)
        if final.exists():  # the same step saved again after a resume: the new save replaces it
            old = root / f".{name}.old"
            if old.exists():
                shutil.rmtree(old)
            final.rename(old)
            tmp.rename(final)
            shutil.rmtree(old)
        else:
            tmp.rename(final)
        _fsync_dir(root)
        _prune(root, keep_last, just_saved=final)
    dist_utils.barrier()
    return final


def _prune(root: Path, keep_last: int, just_saved: Path) -> None:
    kept = 0
    for _, path in list_checkpoints(root):
        if path == just_saved:
            kept += 1
            continue
        problems = verify_checkpoint(path)
        if not problems and kept < keep_last:
            kept += 1
            continue
        why = "; ".join(problems) if problems else f"older than the newest {keep_last}"
        log.info("removing checkpoint %s (%s)", path, why)
        shutil.rmtree(path, ignore_errors=True)


# ------------------------------------------------------------------------------------------- load


def find_latest_good(root: str | Path, report: Callable[[str], None] | None = None) -> tuple[Path | None, list[str]]:
    """The newest good checkpoint under `root` (None if there is none) and one message per newer
    checkpoint skipped, each naming the directory and what is wrong with it."""
    skipped = []
    for _, path in list_checkpoints(root):
        problems = verify_checkpoint(path)
        if not problems:
            return path, skipped
        msg = f"checkpoint {path} is unusable ({'; '.join(problems)}); falling back to the previous one"
        skipped.append(msg)
        if report is not None:
            report(msg)
    return None, skipped


def load_checkpoint(
    root: str | Path, engine: Any | None = None, *, load_optimizer_states: bool = True,
    checkpoint: str | Path | None = None,
) -> LoadedCheckpoint | None:
    """Restore the newest good checkpoint under `root` on every rank: engine weights/optimizer/scheduler,
    this rank's RNG states, and the TrainerState returned. None when no good checkpoint exists.

    checkpoint: load this step directory instead (trainer.resume_mode=<path>); ValueError naming what is
    wrong with it when it is not a good checkpoint (no fallback: the user asked for that one).
    Rank 0 chooses the checkpoint and broadcasts it, so all ranks load the same one.
    """
    chosen: list[Any] = [None, []]
    if dist_utils.get_rank() == 0 and checkpoint is not None:
        problems = verify_checkpoint(checkpoint)
        chosen = [None, problems] if problems else [str(checkpoint), []]
    elif dist_utils.get_rank() == 0:
        path, skipped = find_latest_good(root, report=log.warning)
        chosen = [None if path is None else str(path), skipped]
    chosen = dist_utils.broadcast_object(chosen)
    if chosen[0] is None and checkpoint is not None:
        raise ValueError(f"trainer.resume_mode: {checkpoint} is not a good checkpoint ({'; '.join(chosen[1])})")
    if chosen[0] is None:
        return None
    path = Path(chosen[0])
    state = TrainerState(**json.loads((path / TRAINER_STATE).read_text()))
    if engine is not None:
        load_path, _ = engine.load_checkpoint(
            str(path / ENGINE_DIR),
            tag=ENGINE_TAG,
            load_optimizer_states=load_optimizer_states,
            load_lr_scheduler_states=load_optimizer_states,
        )
        if load_path is None:
            raise RuntimeError(f"DeepSpeed could not load the engine checkpoint in {path / ENGINE_DIR}")
    rng_file = path / f"rng_rank{dist_utils.get_rank()}.pt"
    if rng_file.is_file():
        restore_rng_state(torch.load(rng_file, weights_only=False))
    else:
        log.warning("%s has no RNG state for rank %d (world size changed?); RNG streams are not restored",
                    path, dist_utils.get_rank())
    return LoadedCheckpoint(path=path, state=state, skipped=list(chosen[1]))
