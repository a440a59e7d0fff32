"""Trajectory filter: probe budget, ranking by mean prompt log-prob, probe accuracy and the keep_ratio EMA."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from rexrag_fast.rexrag.filtering import (
    KeepRatio,
    keep_probe_count,
    probe_accuracy,
    prompt_mean_logprobs,
    select_trajectories,
)


def test_keep_probe_count_by_hand():
    # Training script: 512 questions x 5 agents x 0.08 = 204.8 -> 204, then down to a multiple of 8 -> 200.
    assert keep_probe_count(0.08, 512, 5) == 204
    assert keep_probe_count(0.08, 512, 5, multiple_of=8) == 200
    assert keep_probe_count(0.0, 512, 5) == 0
    assert keep_probe_count(0.5, 3, 5) == 7
    with pytest.raises(ValueError, match="keep_ratio"):
        keep_probe_count(-0.1, 4, 5)
    with pytest.raises(ValueError, match="n_agent"):
        keep_probe_count(0.1, 4, 0)


def test_prompt_mean_logprobs_by_hand():
    old = torch.tensor([-1.0, -2.0, -3.0, -0.5, -0.7, -4.0, -9.0, -0.1, -0.3])
    explore = torch.tensor([False, False, False, True, True, False, False, False, True])
    cu = torch.tensor([0, 3, 6, 9], dtype=torch.int32)
    # seq 0: no inserted tokens -> 0; seq 1: mean(-0.5, -0.7) = -0.6; seq 2: -0.3.
    np.testing.assert_allclose(prompt_mean_logprobs(old, cu, explore), [0.0, -0.6, -0.3], rtol=1e-6)


def test_select_trajectories_by_hand():
    is_probe = np.array([False, True, True, False, True, True, True])
    scores = np.array([9.0, -2.0, -0.5, 9.0, -1.0, -0.5, -3.0])
    # Originals 0 and 3 first; then probes by score, ties (2 and 5) in batch order.
    assert select_trajectories(is_probe, scores, 3).tolist() == [0, 3, 2, 5, 4]
    assert select_trajectories(is_probe, scores, 0).tolist() == [0, 3]
    assert select_trajectories(is_probe, scores, 10).tolist() == [0, 3, 2, 5, 4, 1, 6]


def test_select_trajectories_from_packed_scores():
    old = torch.tensor([-1.0, -0.2, -1.0, -0.9, -1.0, -0.1, -1.0])
    explore = torch.tensor([False, True, False, True, False, True, False])
    cu = torch.tensor([0, 1, 3, 5, 7])
    is_probe = np.array([False, True, True, True])
    kept = select_trajectories(is_probe, prompt_mean_logprobs(old, cu, explore), 2)
    assert kept.tolist() == [0, 3, 1]


def test_select_trajectories_rejects_bad_input():
    with pytest.raises(ValueError, match="is_probe"):
        select_trajectories(np.array([0, 1]), np.zeros(2), 1)
    with pytest.raises(ValueError, match="scores"):
        select_trajectories(np.array([False, True]), np.zeros(3), 1)
    with pytest.raises(ValueError, match="NaN"):
        select_trajectories(np.array([False, True]), np.array([0.0, np.nan]), 1)
    with pytest.raises(ValueError, match="max_probes"):
        select_trajectories(np.array([False, True]), np.zeros(2), -1)


def test_probe_accuracy_by_hand():
    rewards = np.array([1.0, 0.0, 1.0, 0.0, 1.0])
    is_probe = np.array([False, True, True, True, False])
    assert probe_accuracy(rewards, is_probe) == pytest.approx(1 / 3)
    assert probe_accuracy(rewards, np.zeros(5, dtype=bool)) == 0.0


def test_keep_ratio_ema_by_hand():
    ema = KeepRatio()
    assert ema.value == pytest.approx(0.08)
    assert ema.update(0.5) == pytest.approx(0.9 * 0.08 + 0.1 * 0.5)  # 0.122
    assert ema.update(0.0) == pytest.approx(0.9 * 0.122)  # 0.1098
    assert ema.update(1.0) == pytest.approx(0.9 * 0.1098 + 0.1)  # 0.19882


def test_keep_ratio_ema_matches_pandas_ewm_recursion():
    accs = np.random.default_rng(0).random(30)
    ema = KeepRatio(0.08)
    for a in accs:
        ema.update(a)
    # pandas Series([0.08, *accs]).ewm(alpha=0.1, adjust=False).mean().iloc[-1], written out.
    expected = 0.08
    for a in accs:
        expected = expected + 0.1 * (a - expected)
    assert ema.value == pytest.approx(expected, rel=1e-12)


def test_keep_ratio_state_round_trip_and_validation():
    ema = KeepRatio(0.2, 0.1)
    ema.update(0.4)
    other = KeepRatio()
    other.load_state_dict(ema.state_dict())
    assert other.value == ema.value and other.weight == ema.weight
    with pytest.raises(ValueError, match="accuracy"):
        ema.update(1.5)
    with pytest.raises(ValueError, match="keep_ratio"):
        KeepRatio(2.0)
