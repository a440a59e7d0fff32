"""Dead-end selection: who is eligible, the reference's draw, determinism, and evaluation."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from rexrag_fast.rexrag.dead_ends import dead_end_probability, select_dead_ends


def test_only_failed_originals_that_can_continue_are_candidates():
    rewards = np.array([1.0, 0.0, 0.5, 0.0, 1.2, 0.0])
    is_original = np.array([True, True, True, False, True, True])
    can_continue = np.array([True, True, True, True, True, False])
    probe = select_dead_ends(rewards, is_original, 100, np.random.default_rng(0), can_continue=can_continue)
    # Correct answers (>= 1), probes and final-turn answers are never probed; with revision_prob = 100 the
    # candidates 1 and 2 are probed unless their draw is exactly 100.
    assert not probe[[0, 3, 4, 5]].any()
    draws = np.random.default_rng(0).integers(0, 101, size=2)
    assert probe[[1, 2]].tolist() == (draws < 100).tolist()


def test_draw_matches_reference_rule_candidate_by_candidate():
    rng = np.random.default_rng(7)
    rewards = rng.integers(0, 2, size=200).astype(float)
    is_original = rng.random(200) < 0.8
    probe = select_dead_ends(rewards, is_original, 20, np.random.default_rng(11))
    # One integer u in {0..100} per candidate, in batch order; probe iff u < revision_prob.
    candidates = np.flatnonzero(is_original & (rewards < 1))
    u = np.random.default_rng(11).integers(0, 101, size=candidates.size)
    expected = np.zeros(200, dtype=bool)
    expected[candidates[u < 20]] = True
    np.testing.assert_array_equal(probe, expected)


def test_same_seed_same_selection_and_rate_close_to_exact_probability():
    rewards = np.zeros(20000)
    is_original = np.ones(20000, dtype=bool)
    a = select_dead_ends(rewards, is_original, 20, np.random.default_rng(3))
    b = select_dead_ends(rewards, is_original, 20, np.random.default_rng(3))
    np.testing.assert_array_equal(a, b)
    # 20/101, not 0.2: u takes 101 values. The binomial std here is about 0.0028.
    assert dead_end_probability(20) == pytest.approx(20 / 101)
    assert abs(a.mean() - 20 / 101) < 0.012


def test_probability_edges():
    assert dead_end_probability(0) == 0.0
    assert dead_end_probability(100) == pytest.approx(100 / 101)
    assert dead_end_probability(20.5) == pytest.approx(21 / 101)
    assert not select_dead_ends(np.zeros(50), np.ones(50, dtype=bool), 0, np.random.default_rng(0)).any()


def test_evaluation_probes_nothing_and_draws_nothing():
    rng = np.random.default_rng(5)
    state = rng.bit_generator.state
    probe = select_dead_ends(np.zeros(10), np.ones(10, dtype=bool), 100, rng, training=False)
    assert not probe.any()
    assert rng.bit_generator.state == state


def test_accepts_torch_inputs():
    probe = select_dead_ends(torch.zeros(4), torch.ones(4, dtype=torch.bool), 100, np.random.default_rng(1))
    assert probe.dtype == np.bool_ and probe.shape == (4,)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"revision_prob": 120}, "revision_prob"),
        ({"revision_prob": -1}, "revision_prob"),
        ({"revision_prob": float("nan")}, "revision_prob"),
        ({"rewards": np.array([0.0, np.inf])}, "finite"),
        ({"is_original": np.array([1, 1])}, "booleans"),
        ({"is_original": np.array([True])}, "shape"),
        ({"can_continue": np.array([True, True, True])}, "can_continue"),
    ],
)
def test_bad_input_is_named(kwargs, match):
    args = {"rewards": np.zeros(2), "is_original": np.ones(2, dtype=bool), "revision_prob": 20}
    args.update(kwargs)
    extra = {"can_continue": args.pop("can_continue")} if "can_continue" in args else {}
    with pytest.raises((ValueError, TypeError), match=match):
        select_dead_ends(args["rewards"], args["is_original"], args["revision_prob"], np.random.default_rng(0), **extra)
