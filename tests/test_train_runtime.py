"""Trainer runtime pieces in one process: metrics JSONL / PNG, signal handling, rank sharding."""

from __future__ import annotations

import json
import math
import os
import signal
from pathlib import Path

import pytest
import torch

from rexrag_fast.train.distributed import all_reduce_mean, broadcast_object, gather_objects, shard_batch, shard_range
from rexrag_fast.train.metrics import METRICS_FILE, MetricsLogger, peak_memory_bytes, plot_curves, read_metrics
from rexrag_fast.train.signals import GracefulStop


def test_metrics_jsonl_and_curves(tmp_path: Path) -> None:
    with MetricsLogger(tmp_path, total_steps=3, tensorboard=True, progress_bar=True) as logger:
        for step in (1, 2, 3):
            logger.log(step, {"reward/mean": torch.tensor(0.1 * step), "actor/loss": 1.0 / step,
                              "throughput/rollout_tokens_per_s": 100.0 * step, "note": "x", "bad": math.nan})
    rows = read_metrics(tmp_path / METRICS_FILE)
    assert [r["step"] for r in rows] == [1, 2, 3]
    assert rows[1]["reward/mean"] == pytest.approx(0.2) and rows[2]["actor/loss"] == pytest.approx(1 / 3)
    assert rows[0]["note"] == "x" and math.isnan(rows[0]["bad"])
    png = tmp_path / "curves.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_metrics_resume_drops_steps_after_checkpoint(tmp_path: Path) -> None:
    with MetricsLogger(tmp_path, progress_bar=False, tensorboard=False) as logger:
        for step in (1, 2, 3, 4):
            logger.log(step, {"actor/loss": float(step)})
    with (tmp_path / METRICS_FILE).open("a") as f:
        f.write('{"step": 5, "actor/lo')  # torn line of a crashed run
    with MetricsLogger(tmp_path, start_step=2, progress_bar=False, tensorboard=False) as logger:
        logger.log(3, {"actor/loss": 30.0})
    rows = read_metrics(tmp_path / METRICS_FILE)
    assert [(r["step"], r["actor/loss"]) for r in rows] == [(1, 1.0), (2, 2.0), (3, 30.0)]


def test_disabled_logger_writes_nothing(tmp_path: Path) -> None:
    logger = MetricsLogger(tmp_path / "rank1", enabled=False)
    rec = logger.log(1, {"a": 1.0})
    assert rec["a"] == 1.0 and logger.close() is None
    assert not (tmp_path / "rank1").exists()


def test_plot_without_reward_or_throughput(tmp_path: Path) -> None:
    (tmp_path / "m.jsonl").write_text(json.dumps({"step": 1, "actor/loss": 0.5}) + "\n")
    assert plot_curves(tmp_path / "m.jsonl", tmp_path / "c.png").stat().st_size > 0


def test_peak_memory_positive() -> None:
    assert peak_memory_bytes() > 1 << 20


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_graceful_stop_records_signal_and_restores_handler(signum: int) -> None:
    before = signal.getsignal(signum)
    with GracefulStop() as stop:
        assert not stop.requested and not stop.requested_on_any_rank()
        os.kill(os.getpid(), signum)  # delivered to the main thread before kill() returns to Python code
        assert stop.requested and stop.received == signum and stop.requested_on_any_rank()
        os.kill(os.getpid(), signal.SIGTERM)  # a second SIGTERM is ignored
    assert signal.getsignal(signum) is before


def test_second_sigint_interrupts() -> None:
    with GracefulStop() as stop, pytest.raises(KeyboardInterrupt):
        os.kill(os.getpid(), signal.SIGINT)
        assert stop.requested
        os.kill(os.getpid(), signal.SIGINT)


@pytest.mark.parametrize(("n", "world"), [(10, 3), (2, 4), (0, 2), (8, 8), (7, 1)])
def test_shard_range_partitions(n: int, world: int) -> None:
    shards = [shard_range(n, r, world) for r in range(world)]
    assert [i for s in shards for i in s] == list(range(n))
    sizes = [len(s) for s in shards]
    assert max(sizes) - min(sizes) <= 1 and sizes == sorted(sizes, reverse=True)
    assert shard_batch(list("abcdefghij")[:n], 0, world) == list("abcdefghij")[: sizes[0]]


def test_shard_range_bad_rank() -> None:
    with pytest.raises(ValueError, match="rank 3 is not in a world of size 3"):
        shard_range(5, 3, 3)


def test_single_process_collectives_are_identity() -> None:
    assert broadcast_object({"a": 1}) == {"a": 1}
    assert gather_objects(5) == [5]
    assert all_reduce_mean({"x": 2.0}) == {"x": 2.0}
