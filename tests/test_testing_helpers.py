"""The shared tolerance helper: passes within tolerance, fails loudly with the worst elements otherwise."""

from __future__ import annotations

import pytest
import torch

from rexrag_fast.testing import assert_close, tolerance


def test_tolerances_grow_with_coarser_dtypes() -> None:
    assert tolerance(torch.float32)[0] < tolerance(torch.float16)[0] <= tolerance(torch.bfloat16)[0]
    assert tolerance(torch.bfloat16, scale=2.0)[1] == 2 * tolerance(torch.bfloat16)[1]


def test_within_tolerance_passes_and_specials_match() -> None:
    x = torch.tensor([1.0, float("inf"), float("nan"), -float("inf")])
    assert_close(x + torch.tensor([1e-7, 0.0, 0.0, 0.0]), x)


def test_failure_lists_worst_elements_first() -> None:
    expected = torch.zeros(4, 5)
    actual = expected.clone()
    actual[1, 2] = 0.5
    actual[3, 4] = 2.0
    with pytest.raises(AssertionError) as info:
        assert_close(actual, expected, name="grad")
    msg = str(info.value)
    assert "grad: 2 of 20 elements differ" in msg
    assert msg.index("(3, 4)") < msg.index("(1, 2)")


def test_inf_against_finite_fails() -> None:
    with pytest.raises(AssertionError, match="1 of 2"):
        assert_close(torch.tensor([1.0, float("inf")]), torch.tensor([1.0, 1.0]))


def test_shape_mismatch_is_reported() -> None:
    with pytest.raises(AssertionError, match=r"shape \(3,\) != expected \(4,\)"):
        assert_close(torch.zeros(3), torch.zeros(4))
