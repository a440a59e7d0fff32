"""Checkpoints without an engine (trainer state + RNG): atomic layout, corruption detection and fallback,
keep-last pruning, exact RNG restore; then with a REAL DeepSpeed ZeRO-3 engine on 2 CPU ranks (gloo): every
file fsynced before COMPLETE, zeroed and bit-flipped shards detected, a failed load falling back. The resume
chain of a training run is exercised by tests/test_zero3_actor.py."""

from __future__ import annotations

import json
import logging
import random
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from dist_helpers import run_torchrun

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


def test_trainer_state_that_fails_to_load_falls_back(tmp_path: Path) -> None:
    """A checkpoint that verifies (manifest rewritten to match) but whose state cannot be built."""
    _save(tmp_path, 1)
    newest = _save(tmp_path, 2)
    (newest / TRAINER_STATE).write_text('{"step": 2, "no_such_field": 1}')
    manifest = json.loads((newest / MANIFEST).read_text())
    manifest["files"][TRAINER_STATE] = {"size": (newest / TRAINER_STATE).stat().st_size}
    (newest / MANIFEST).write_text(json.dumps(manifest))
    assert verify_checkpoint(newest) == []
    loaded = load_checkpoint(tmp_path)
    assert loaded is not None and loaded.state.step == 1
    assert len(loaded.skipped) == 1
    assert "step_000002 could not be loaded (rank 0: trainer_state.json: TypeError" in loaded.skipped[0]
    assert "falling back to the previous one" in loaded.skipped[0]


# ------------------------------------------------------------------------- real ZeRO-3 engine, 2 ranks

ROOT = Path(__file__).resolve().parents[1]
ENGINE_SCRIPT = ROOT / "tests" / "dist_scripts" / "checkpoint_engine.py"
ENGINE_TIMEOUT_S = 400


@pytest.fixture(scope="module")
def engine_saves(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """2 ZeRO-3 steps on 2 ranks, each saved hashed (`hashed/`) and size-checked only (`sized/`)."""
    out = tmp_path_factory.mktemp("engine_saves")
    run_torchrun([str(ENGINE_SCRIPT), "save", "--out", str(out), "--steps", "2"], cwd=ROOT,
                 timeout_s=ENGINE_TIMEOUT_S)
    return out


def _fsynced(out: Path) -> dict[int, dict[str, int]]:
    """rank -> {path inside the final checkpoint directory: order of its last fsync on that rank}."""
    got: dict[int, dict[str, int]] = {}
    for f in sorted(out.glob("fsync_rank*.jsonl")):
        rank = int(f.stem.removeprefix("fsync_rank"))
        for line in f.read_text().splitlines():
            rec = json.loads(line)
            path = rec["path"]
            for part in Path(path).parts:  # .step_000002.tmp/... is step_000002/... once renamed
                if part.startswith(".step_") and part.endswith(".tmp"):
                    path = path.replace(part, part[1:-4])
            got.setdefault(rank, {})[path] = rec["n"]
    return got


def test_engine_files_fsynced_before_complete(engine_saves: Path) -> None:
    fsynced = _fsynced(engine_saves)
    assert sorted(fsynced) == [0, 1]
    for kind in ("hashed", "sized"):
        for step_dir in sorted((engine_saves / kind).iterdir()):
            files = [p for p in step_dir.rglob("*") if p.is_file()]
            engine_files = [p for p in files if "deepspeed" in p.parts]
            assert len(engine_files) >= 3, files  # model states + one optimizer shard per rank
            complete = fsynced[0][str(step_dir / COMPLETE)]
            for p in files:
                if p.name == COMPLETE:
                    continue
                assert any(str(p) in per_rank for per_rank in fsynced.values()), f"{p} never fsynced"
                if str(p) in fsynced[0]:
                    assert fsynced[0][str(p)] < complete, f"{p} fsynced after {COMPLETE}"


def _optimizer_shard(step_dir: Path) -> Path:
    return sorted((step_dir / "deepspeed").rglob("*optim_states.pt"))[-1]


def _zero_fill(f: Path) -> None:
    f.write_bytes(bytes(f.stat().st_size))  # what a power loss leaves: the size is right, the pages are zero


def _flip_bytes(f: Path) -> None:
    data = bytearray(f.read_bytes())
    for i in range(len(data) // 2, len(data) // 2 + 64, 8):
        data[i] ^= 0x5A
    f.write_bytes(bytes(data))


def test_broken_engine_shards_fall_back_to_the_previous_checkpoint(engine_saves: Path, tmp_path: Path) -> None:
    cases = {"good": ("hashed", None), "zeroed": ("hashed", _zero_fill), "flipped": ("hashed", _flip_bytes),
             "zeroed_unhashed": ("sized", _zero_fill)}
    roots = []
    broken = {}
    for name, (kind, corrupt) in cases.items():
        root = tmp_path / name
        shutil.copytree(engine_saves / kind, root)
        if corrupt is not None:
            shard = _optimizer_shard(root / "step_000002")
            corrupt(shard)
            broken[name] = shard.relative_to(root / "step_000002").as_posix()
        roots.append(str(root))
    manifest = json.loads((engine_saves / "sized" / "step_000002" / MANIFEST).read_text())
    assert all(("sha256" in e) == (not rel.startswith("deepspeed/")) for rel, e in manifest["files"].items())
    # Verification alone: hashes catch both corruptions; sizes alone catch neither.
    assert any("fails its sha256 check" in p for p in verify_checkpoint(tmp_path / "zeroed" / "step_000002"))
    assert any("fails its sha256 check" in p for p in verify_checkpoint(tmp_path / "flipped" / "step_000002"))
    assert verify_checkpoint(tmp_path / "zeroed_unhashed" / "step_000002") == []

    out = tmp_path / "load"
    run_torchrun([str(ENGINE_SCRIPT), "load", "--out", str(out), "--roots", *roots], cwd=ROOT,
                 timeout_s=ENGINE_TIMEOUT_S)
    results = {Path(r["root"]).name: (i, r) for i, r in enumerate(json.loads((out / "loaded.json").read_text()))}
    expected_step = {"good": 2, "zeroed": 1, "flipped": 1, "zeroed_unhashed": 1}
    for name, (i, r) in results.items():
        assert r["step"] == expected_step[name], (name, r)
        want = torch.load(engine_saves / f"weights_step{r['step']}.pt")
        got = torch.load(out / f"loaded_{i}.pt")
        assert want.keys() == got.keys()
        for key in want:
            assert torch.equal(got[key], want[key]), (name, key)
    assert results["good"][1]["skipped"] == []
    for name in ("zeroed", "flipped"):
        (msg,) = results[name][1]["skipped"]
        assert "step_000002 is unusable" in msg and f"{broken[name]} fails its sha256 check" in msg, msg
    (msg,) = results["zeroed_unhashed"][1]["skipped"]
    assert "step_000002 could not be loaded" in msg and broken["zeroed_unhashed"] in msg, msg
    assert "falling back to the previous one" in msg
