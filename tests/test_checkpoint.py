"""Checkpoints without an engine (trainer state + RNG): atomic layout, corruption detection and fallback,
keep-last pruning, exact RNG restore. The DeepSpeed engine half is exercised by tests/test_zero3_actor.py."""

from __future__ import annotations

import json
import logging
import random
from pathlib import Path

import numpy as np
import pytest
import torch

from rexrag_fast.train.checkpoint import (
    COMPLETE,
    MANIFEST,
    TRAINER_STATE,
    TrainerState,
    find_latest_good,
    list_checkpoints,
    load_checkpoint,
    save_checkpoint,
    verify_checkpoint,
)


def _draws() -> tuple[float, float, list[float]]:
    return random.random(), float(np.random.rand()), torch.rand(3).tolist()


def _save(root: Path, step: int, keep_last: int = 5) -> Path:
    state = TrainerState(step=step, data_position=step * 4, epoch=step // 10, keep_ratio_ewm=0.05 + step / 100,
                         engine_config={"zero_optimization": {"stage": 3}}, extra={"note": f"s{step}"})
    return save_checkpoint(root, state, keep_last=keep_last)


def test_layout_and_round_trip(tmp_path: Path, seed: int) -> None:
    path = _save(tmp_path, 3)
    assert path.name == "step_000003"
    assert sorted(p.name for p in path.iterdir()) == sorted([COMPLETE, MANIFEST, TRAINER_STATE, "rng_rank0.pt"])
    assert not any(p.name.startswith(".") for p in tmp_path.iterdir())  # no temporary left behind
    manifest = json.loads((path / MANIFEST).read_text())
    assert set(manifest["files"]) == {TRAINER_STATE, "rng_rank0.pt"}
    assert all(len(e["sha256"]) == 64 for e in manifest["files"].values())
    assert verify_checkpoint(path) == []
    loaded = load_checkpoint(tmp_path)
    assert loaded is not None and loaded.path == path and loaded.skipped == []
    assert loaded.state == TrainerState(step=3, data_position=12, epoch=0, keep_ratio_ewm=0.08,
                                        engine_config={"zero_optimization": {"stage": 3}}, extra={"note": "s3"})


def test_rng_states_restored_exactly(tmp_path: Path, seed: int) -> None:
    _draws()
    _save(tmp_path, 1)
    expected = _draws()
    _draws()  # move every stream on
    load_checkpoint(tmp_path)
    assert _draws() == expected


def test_empty_root(tmp_path: Path) -> None:
    assert load_checkpoint(tmp_path / "nothing") is None
    assert find_latest_good(tmp_path) == (None, [])


def _corrupt_missing_marker(p: Path) -> str:
    (p / COMPLETE).unlink()
    return "no COMPLETE marker"


def _corrupt_flip_byte(p: Path) -> str:
    f = p / TRAINER_STATE
    data = bytearray(f.read_bytes())
    data[5] ^= 0x01
    f.write_bytes(bytes(data))
    return "trainer_state.json fails its sha256 check"


def _corrupt_truncate(p: Path) -> str:
    f = p / "rng_rank0.pt"
    f.write_bytes(f.read_bytes()[:-10])
    return "rng_rank0.pt has"


def _corrupt_manifest(p: Path) -> str:
    (p / MANIFEST).write_text("{not json")
    return "manifest.json is unreadable"


def _corrupt_delete_file(p: Path) -> str:
    (p / "rng_rank0.pt").unlink()
    return "rng_rank0.pt is missing"


@pytest.mark.parametrize(
    "corrupt", [_corrupt_missing_marker, _corrupt_flip_byte, _corrupt_truncate, _corrupt_manifest,
                _corrupt_delete_file],
)
def test_corrupt_checkpoint_falls_back_to_previous(
    tmp_path: Path, corrupt, caplog: pytest.LogCaptureFixture, seed: int
) -> None:
    _save(tmp_path, 2)
    newest = _save(tmp_path, 4)
    why = corrupt(newest)
    problems = verify_checkpoint(newest)
    assert problems and why in problems[0]
    with caplog.at_level(logging.WARNING, logger="rexrag_fast.train.checkpoint"):
        loaded = load_checkpoint(tmp_path)
    assert loaded is not None and loaded.state.step == 2
    assert len(loaded.skipped) == 1 and "step_000004 is unusable" in loaded.skipped[0] and why in loaded.skipped[0]
    assert "falling back to the previous one" in caplog.text


def test_all_corrupt_gives_none(tmp_path: Path) -> None:
    first, second = _save(tmp_path, 1), _save(tmp_path, 2)
    _corrupt_missing_marker(first)
    _corrupt_flip_byte(second)
    path, skipped = find_latest_good(tmp_path)
    assert path is None and len(skipped) == 2
    assert load_checkpoint(tmp_path) is None


def test_interrupted_save_is_invisible(tmp_path: Path) -> None:
    _save(tmp_path, 1)
    stale = tmp_path / ".step_000002.tmp"  # what a save killed half way leaves
    stale.mkdir()
    (stale / TRAINER_STATE).write_text("{}")
    assert [s for s, _ in list_checkpoints(tmp_path)] == [1]
    loaded = load_checkpoint(tmp_path)
    assert loaded is not None and loaded.state.step == 1
    _save(tmp_path, 2)  # the next save of that step clears the leftover
    assert not stale.exists() and verify_checkpoint(tmp_path / "step_000002") == []


def test_keep_last_prunes_old_and_broken(tmp_path: Path) -> None:
    for step in (1, 2, 3):
        _save(tmp_path, step, keep_last=2)
    assert [s for s, _ in list_checkpoints(tmp_path)] == [3, 2]
    _corrupt_flip_byte(tmp_path / "step_000003")
    _save(tmp_path, 4, keep_last=2)  # broken step 3 removed, good 2 kept as the second
    assert [s for s, _ in list_checkpoints(tmp_path)] == [4, 2]


def test_resave_same_step_replaces(tmp_path: Path) -> None:
    _save(tmp_path, 5)
    state = TrainerState(step=5, data_position=99)
    save_checkpoint(tmp_path, state)
    loaded = load_checkpoint(tmp_path)
    assert loaded is not None and loaded.state.data_position == 99
    assert [p.name for p in tmp_path.iterdir()] == ["step_000005"]


def test_keep_last_validated(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="keep_last: expected >= 1, got 0"):
        save_checkpoint(tmp_path, TrainerState(step=1), keep_last=0)
