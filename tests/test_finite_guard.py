"""Non-finite updates: the guard's count / warn / stop logic in process, then REAL ZeRO-3 runs on CPU ranks
(gloo) through torchrun with a NaN injected into one rank's old log-probs: the update is skipped on every
rank with a warning and the weights stay finite; N non-finite updates in a row stop the run with a clear
error."""

from __future__ import annotations

import logging
import subprocess
from pathlib import Path

import pytest
import torch
from dist_helpers import run_torchrun, torchrun_command, torchrun_env

from rexrag_fast.train.finite_guard import FiniteGuard, NonFiniteUpdateError
from rexrag_fast.train.metrics import read_metrics

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "tests" / "dist_scripts" / "zero3_update.py"
RUN_TIMEOUT_S = 400


def test_guard_skips_warns_and_stops_after_n_in_a_row(caplog: pytest.LogCaptureFixture) -> None:
    guard = FiniteGuard(3)
    assert guard.agree(True) and guard.bad_ranks == []
    assert not guard.agree(False) and guard.bad_ranks == [0]
    with caplog.at_level(logging.WARNING, logger="rexrag_fast.train.finite_guard"):
        guard.record(False, where="RL step 4, epoch 1, mini-batch 1 of 2", what="ranks [0]")
        guard.record(False, where="RL step 4, epoch 1, mini-batch 2 of 2", what="gradient norm nan")
    assert "RL step 4, epoch 1, mini-batch 1 of 2: non-finite loss or gradient (ranks [0]); update " \
           "skipped (1 in a row, the run stops at 3 = actor.max_nonfinite_updates)" in caplog.text
    assert "(2 in a row" in caplog.text
    assert guard.metrics() == {"actor/skipped_updates": 2.0, "actor/nonfinite_streak": 2.0}
    guard.record(True, where="RL step 5, epoch 1, mini-batch 1 of 2")  # a finite update resets the streak
    assert guard.metrics() == {"actor/skipped_updates": 0.0, "actor/nonfinite_streak": 0.0}
    guard.record(False, where="s6", what="x")
    guard.record(False, where="s7", what="x")
    with pytest.raises(NonFiniteUpdateError, match=r"s8: 3 optimizer steps in a row had a non-finite loss or "
                                                   r"gradient \(y\); stopping \(actor.max_nonfinite_updates = 3\)"):
        guard.record(False, where="s8", what="y")


def test_guard_rejects_a_limit_below_one() -> None:
    with pytest.raises(ValueError, match="max_in_a_row: expected >= 1, got 0"):
        FiniteGuard(0)


def _torchrun(out: Path, *args: str, nproc: int = 2) -> subprocess.CompletedProcess:
    out.mkdir(parents=True, exist_ok=True)
    return run_torchrun([str(SCRIPT), "--out", str(out), *args], cwd=ROOT, timeout_s=RUN_TIMEOUT_S, nproc=nproc)


@pytest.mark.slow
@pytest.mark.parametrize("stage", ["3", "0"])
def test_nan_on_one_rank_skips_that_update_everywhere(tmp_path: Path, stage: str) -> None:
    """Step 2: rank 1's first micro-batch has a NaN old log-prob. That mini-batch's optimizer step (once per
    PPO epoch) is skipped on both ranks; the other steps train; the weights stay finite (stage 0 would
    otherwise apply NaN gradients)."""
    proc = _torchrun(tmp_path, "--max-steps", "3", "--zero-stage", stage, "--nan-steps", "2")
    rows = read_metrics(tmp_path / "metrics.jsonl")
    assert [r["step"] for r in rows] == [1, 2, 3]
    assert [r["actor/skipped_updates"] for r in rows] == [0.0, 2.0, 0.0]  # ppo_epochs 2 x the poisoned mini-batch
    assert all(r["actor/nonfinite_streak"] == 0.0 for r in rows)
    # Stage 3: only rank 1's loss was NaN. Stage 0: the all-reduced gradient is NaN on both ranks too.
    ranks = "[1]" if stage == "3" else "[0, 1]"
    assert f"RL step 2, epoch 1, mini-batch 1 of 2: non-finite loss or gradient (ranks {ranks}); update skipped" \
        in proc.stderr
    final = torch.load(tmp_path / "weights_step3.pt")
    start = torch.load(tmp_path / "weights_step0.pt")
    for name, w in final.items():
        assert torch.isfinite(w).all(), name
        assert not torch.equal(w, start[name]), name  # the finite updates were applied


@pytest.mark.slow
def test_nan_in_every_update_stops_the_run(tmp_path: Path) -> None:
    cmd = torchrun_command([str(SCRIPT), "--out", str(tmp_path), "--max-steps", "3", "--nan-steps", "2", "3",
                            "--nan-everywhere", "--max-nonfinite", "3"])
    proc = subprocess.run(cmd, cwd=ROOT, env=torchrun_env(), capture_output=True, text=True, timeout=RUN_TIMEOUT_S)
    assert proc.returncode != 0
    assert "NonFiniteUpdateError: RL step 2, epoch 2, mini-batch 1 of 2: 3 optimizer steps in a row had a " \
           "non-finite loss or gradient (ranks [1]); stopping (actor.max_nonfinite_updates = 3)" \
        in proc.stderr, proc.stderr[-4000:]
    assert [r["step"] for r in read_metrics(tmp_path / "metrics.jsonl")] == [1]
