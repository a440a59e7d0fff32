"""Checkpoints: a DeepSpeed engine checkpoint plus trainer state, written atomically, verified on load.

Layout under `root` (the run's `<output_dir>/checkpoints`):

    step_000050/
      deepspeed/ds/...          engine.save_checkpoint(save_dir=.../deepspeed, tag="ds"): every rank's shards
      trainer_state.json        step, data position, keep-ratio average, engine config, extra (rank 0)
      rng_rank{r}.pt            Python / NumPy / torch (CPU and CUDA) RNG states of rank r
      manifest.json             sha256 and size of every state file, size of every engine file
      COMPLETE                  written last: its absence means the save never finished
    .step_000050.tmp/           a save in progress; renamed to step_000050/ only once COMPLETE is in it

Every file is fsynced by the ranks before COMPLETE is written, so that a power loss cannot leave a COMPLETE
checkpoint whose shards are still zero-filled pages. A checkpoint is good when COMPLETE and manifest.json
exist, every listed file exists with its size, and every file's sha256 matches. Hashing is streamed (1 MiB
at a time) and shared between the ranks. `hash_engine_files=False` skips the sha256 of the engine shards
(the multi-GB model and optimizer states): they are then checked by size only, so a shard of the right size
with wrong content (zeroed pages after a crash, flipped bits) passes verification and is only caught if
DeepSpeed or torch.load fails on it, while flipped bits inside tensor data load silently as wrong weights.

Loading takes the newest good checkpoint; if reading it fails on any rank (a file torch cannot load, an
error inside DeepSpeed, unreadable trainer state), every rank falls back to the next older good one. Each
skipped checkpoint gets a message naming the directory, the file and what is wrong with it. After each save
the newest `keep_last` good checkpoints stay; older ones and broken ones are deleted.
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
    """Hex sha256 of the file at `path`, read `chunk` bytes at a time."""
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


def _fsync_tree(root: Path) -> None:
    """fsync every file and directory under `root` (root included). A rank calls it after writing its files:
    on a shared file system only the writer's fsync is sure to reach the disk, and fsync of a clean file is
    cheap, so every rank syncs everything it sees."""
    for dirpath, _, filenames in os.walk(root):
        for name in filenames:
            _fsync_file(Path(dirpath) / name)
        _fsync_dir(Path(dirpath))


def _state_files(ckpt: Path) -> list[tuple[str, int]]:
    """(relative path, size) of every file of a checkpoint being written, manifest and marker excluded."""
    return [(p.relative_to(ckpt).as_posix(), p.stat().st_size) for p in sorted(ckpt.rglob("*"))
            if p.is_file() and p.name not in (MANIFEST, COMPLETE)]


def _hash_share(files: list[tuple[str, int]], hash_engine_files: bool, rank: int, world: int) -> list[str]:
    """The files this rank hashes: the hashed ones dealt largest first to the rank with the fewest bytes."""
    load = [0] * world
    mine = []
    for rel, size in sorted(files, key=lambda f: (-f[1], f[0])):
        if not hash_engine_files and rel.startswith(ENGINE_DIR + "/"):
            continue
        r = load.index(min(load))
        load[r] += size
        if r == rank:
            mine.append(rel)
    return mine


def _write_manifest(ckpt: Path, step: int, files: list[tuple[str, int]], hashes: dict[str, str]) -> None:
    entries: dict[str, dict[str, Any]] = {}
    for rel, size in files:
        entries[rel] = {"size": size}
        if rel in hashes:
            entries[rel]["sha256"] = hashes[rel]
    manifest = {"format": 1, "step": step, "created": time.time(), "files": entries}
    (ckpt / MANIFEST).write_text(json.dumps(manifest, indent=1, sort_keys=True))
    _fsync_file(ckpt / MANIFEST)


def verify_checkpoint(path: str | Path, *, hash_engine_files: bool = True) -> list[str]:
    """Problems that make the checkpoint at `path` unusable; empty when it is good.

    hash_engine_files=False compares the engine shards' sizes but not their sha256 (pruning uses it: it
    would otherwise re-read every kept checkpoint at every save)."""
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
        hash_it = hash_engine_files or not rel.startswith(ENGINE_DIR + "/")
        if hash_it and "sha256" in entry and sha256_file(p) != entry["sha256"]:
            problems.append(f"{rel} fails its sha256 check")
    return problems


# ------------------------------------------------------------------------------------------- save


def save_checkpoint(
    root: str | Path,
    state: TrainerState,
    engine: Any | None = None,
    *,
    keep_last: int = 3,
    hash_engine_files: bool = True,
) -> Path:
    """Write checkpoint `step_{state.step}` under `root` atomically; call on every rank together.

    engine: a DeepSpeed engine (its `save_checkpoint` is collective) or None for trainer state only.
    hash_engine_files: sha256 of the engine shards too (default). False checks them by size only: see the
        module docstring for what a size check misses.
    Returns the final checkpoint directory. Older checkpoints beyond `keep_last` good ones are deleted.
    """
    if keep_last < 1:
        raise ValueError(f"keep_last: expected >= 1, got {keep_last}")
    root = Path(root)
    rank, world = dist_utils.get_rank(), dist_utils.get_world_size()
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
    if rank == 0:
        (tmp / TRAINER_STATE).write_text(json.dumps(asdict(state), indent=1, sort_keys=True, default=str))
    _fsync_tree(tmp)
    dist_utils.barrier()

    # Every file is on disk now; hash them in shares, then rank 0 writes the manifest and the marker.
    files = dist_utils.broadcast_object(_state_files(tmp) if rank == 0 else None)
    mine = {rel: sha256_file(tmp / rel) for rel in _hash_share(files, hash_engine_files, rank, world)}
    hashes = {k: v for share in dist_utils.gather_objects(mine) for k, v in share.items()}
    if rank == 0:
        _write_manifest(tmp, state.step, files, hashes)
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
        problems = verify_checkpoint(path, hash_engine_files=False)
        if not problems and kept < keep_last:
            kept += 1
            continue
        why = "; ".join(problems) if problems else f"older than the newest {keep_last}"
        log.info("removing checkpoint %s (%s)", path, why)
        shutil.rmtree(path, ignore_errors=True)


# ------------------------------------------------------------------------------------------- load


def find_latest_good(root: str | Path, report: Callable[[str], None] | None = None, *,
                     below_step: int | None = None) -> tuple[Path | None, list[str]]:
    """The newest good checkpoint under `root` (None if there is none), only among steps < `below_step` when
    given, and one message per newer checkpoint skipped, each naming the directory and what is wrong."""
    skipped = []
    for step, path in list_checkpoints(root):
        if below_step is not None and step >= below_step:
            continue
        problems = verify_checkpoint(path)
        if not problems:
            return path, skipped
        msg = f"checkpoint {path} is unusable ({'; '.join(problems)}); falling back to the previous one"
        skipped.append(msg)
        if report is not None:
            report(msg)
    return None, skipped


def _engine_files_readable(path: Path) -> str | None:
    """The first engine file that torch.load cannot open, with its error (None when all open). Memory-mapped,
    so tensor data is not read: this catches truncated or zeroed files before DeepSpeed's collective load
    starts on some ranks and fails on others."""
    for f in sorted((path / ENGINE_DIR).rglob("*.pt")):
        try:
            torch.load(f, map_location="cpu", weights_only=False, mmap=True)
        except Exception as e:  # any failure to read it makes the checkpoint unusable
            return f"{f.relative_to(path).as_posix()}: {type(e).__name__}: {e}"
    return None


def _read_small_files(path: Path) -> tuple[TrainerState | None, dict[str, Any] | None, str | None]:
    """(trainer state, this rank's RNG state or None if absent, None) or (None, None, what failed)."""
    try:
        state = TrainerState(**json.loads((path / TRAINER_STATE).read_text()))
    except Exception as e:  # unreadable JSON, a field missing or unknown: the checkpoint is unusable
        return None, None, f"{TRAINER_STATE}: {type(e).__name__}: {e}"
    rng_file = path / f"rng_rank{dist_utils.get_rank()}.pt"
    try:
        rng = torch.load(rng_file, weights_only=False) if rng_file.is_file() else None
    except Exception as e:
        return None, None, f"{rng_file.name}: {type(e).__name__}: {e}"
    return state, rng, None


def _restore(path: Path, engine: Any | None, load_optimizer_states: bool) -> tuple[TrainerState | None, list[str]]:
    """Load checkpoint `path` on every rank together: (trainer state, []) or (None, what failed on which rank,
    naming the file). The RNG state is restored only when everything else loaded."""
    state, rng, error = _read_small_files(path)
    if error is None and engine is not None:
        error = _engine_files_readable(path)
    # Every rank must enter DeepSpeed's load or none (it runs collectives), so failures are agreed first.
    errors = [f"rank {r}: {e}" for r, e in enumerate(dist_utils.gather_objects(error)) if e]
    if errors:
        return None, errors
    if engine is not None:
        try:
            load_path, _ = engine.load_checkpoint(
                str(path / ENGINE_DIR),
                tag=ENGINE_TAG,
                load_optimizer_states=load_optimizer_states,
                load_lr_scheduler_states=load_optimizer_states,
            )
            error = None if load_path is not None else f"{ENGINE_DIR}/{ENGINE_TAG}: DeepSpeed found no checkpoint"
        except Exception as e:
            error = f"{ENGINE_DIR}/{ENGINE_TAG}: DeepSpeed failed to load it: {type(e).__name__}: {e}"
        errors = [f"rank {r}: {e}" for r, e in enumerate(dist_utils.gather_objects(error)) if e]
        if errors:
            return None, errors
    if rng is not None:
        restore_rng_state(rng)
    else:
        log.warning("%s has no RNG state for rank %d (world size changed?); RNG streams are not restored",
                    path, dist_utils.get_rank())
    return state, []


def load_checkpoint(
    root: str | Path, engine: Any | None = None, *, load_optimizer_states: bool = True,
    checkpoint: str | Path | None = None,
) -> LoadedCheckpoint | None:
    """Restore the newest good checkpoint under `root` on every rank: engine weights/optimizer/scheduler,
    this rank's RNG states, and the TrainerState returned. None when no good checkpoint exists.

    Rank 0 chooses the checkpoint and broadcasts it, so all ranks load the same one. When loading it fails
    on any rank, all ranks fall back to the next older good checkpoint, and so on.
    checkpoint: load this step directory instead (trainer.resume_mode=<path>); ValueError naming what is
    wrong with it when it is not a good checkpoint or fails to load (no fallback: the user asked for it).
    """
    if checkpoint is not None:
        problems = verify_checkpoint(checkpoint) if dist_utils.get_rank() == 0 else []
        problems = dist_utils.broadcast_object(problems)
        state, errors = (None, problems) if problems else _restore(Path(checkpoint), engine, load_optimizer_states)
        if errors:
            raise ValueError(f"trainer.resume_mode: {checkpoint} is not a good checkpoint ({'; '.join(errors)})")
        return LoadedCheckpoint(path=Path(checkpoint), state=state, skipped=[])
    skipped: list[str] = []
    below: int | None = None
    while True:
        chosen: list[Any] = [None, []]
        if dist_utils.get_rank() == 0:
            path, newer = find_latest_good(root, report=log.warning, below_step=below)
            chosen = [None if path is None else str(path), newer]
        chosen = dist_utils.broadcast_object(chosen)
        skipped.extend(chosen[1])
        if chosen[0] is None:
            return None
        path = Path(chosen[0])
        state, errors = _restore(path, engine, load_optimizer_states)
        if not errors:
            return LoadedCheckpoint(path=path, state=state, skipped=skipped)
        msg = f"checkpoint {path} could not be loaded ({'; '.join(errors)}); falling back to the previous one"
        if dist_utils.get_rank() == 0:
            log.warning(msg)
        skipped.append(msg)
        below = int(_STEP_RE.match(path.name).group(1))
