"""Packing into varlen micro-batches: first-fit decreasing properties, exact round trips."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from rexrag_fast.train.packing import (
    first_fit_decreasing,
    pack_micro_batches,
    pack_sequences,
    packed_to_padded,
    padded_to_packed,
    plan_mini_batches,
    scatter_back,
    unpack,
)

lengths_and_budget = st.integers(1, 64).flatmap(
    lambda budget: st.tuples(st.lists(st.integers(1, budget), min_size=1, max_size=40), st.just(budget))
)


@settings(max_examples=200, deadline=None)
@given(lengths_and_budget)
def test_ffd_partition_and_budget(case: tuple[list[int], int]) -> None:
    lengths, budget = case
    bins = first_fit_decreasing(lengths, budget)
    flat = sorted(i for b in bins for i in b)
    assert flat == list(range(len(lengths)))  # every sequence exactly once
    assert all(sum(lengths[i] for i in b) <= budget for b in bins)
    # First fit leaves at most one bin at most half full, so bins < 2 * total / budget + 1.
    assert len(bins) < 2 * sum(lengths) / budget + 1
    assert len(bins) >= math.ceil(sum(lengths) / budget)
    # First fit: an item went to a later bin only because it did not fit an earlier one, and rooms only
    # shrink, so every item is larger than the final free room of every bin opened before its own.
    room = [budget - sum(lengths[i] for i in b) for b in bins]
    for j, b in enumerate(bins):
        assert all(lengths[i] > r for i in b for r in room[:j])
    assert first_fit_decreasing(lengths, budget) == bins  # deterministic


def test_ffd_known_plan() -> None:
    # sorted: 7(i1) 5(i0) 5(i3) 3(i2) 2(i4); budget 10 -> [7,3], [5,5], [2]
    assert first_fit_decreasing([5, 7, 3, 5, 2], 10) == [[1, 2], [0, 3], [4]]


@pytest.mark.parametrize(
    ("lengths", "budget", "match"),
    [([3, 11], 10, r"lengths\[1\] = 11 exceeds the micro-batch token budget max_tokens = 10"),
     ([3, 0], 10, r"lengths\[1\]: expected a positive length, got 0"),
     ([3], 0, r"max_tokens: expected a positive integer, got 0")],
)
def test_ffd_errors(lengths: list[int], budget: int, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        first_fit_decreasing(lengths, budget)


def _trajectories(lengths: list[int], seed: int) -> tuple[list[list[int]], dict, dict]:
    g = torch.Generator().manual_seed(seed)
    ids = [torch.randint(0, 1000, (n,), generator=g).tolist() for n in lengths]
    per_token = {
        "response_mask": [torch.rand(n, generator=g) > 0.5 for n in lengths],
        "old_logprobs": [-torch.rand(n, generator=g, dtype=torch.float64) for n in lengths],
    }
    per_seq = {"rewards": torch.rand(len(lengths), generator=g), "group_ids": torch.arange(len(lengths)) // 3}
    return ids, per_token, per_seq


@settings(max_examples=100, deadline=None)
@given(lengths_and_budget, st.integers(0, 2**16))
def test_pack_scatter_round_trip(case: tuple[list[int], int], seed: int) -> None:
    lengths, budget = case
    ids, per_token, per_seq = _trajectories(lengths, seed)
    mbs = pack_micro_batches(ids, budget, per_token, per_seq)
    assert sum(mb.num_sequences for mb in mbs) == len(lengths)
    for mb in mbs:
        assert mb.cu_seqlens.dtype == torch.int32 and int(mb.cu_seqlens[0]) == 0
        assert mb.num_tokens == int(mb.cu_seqlens[-1]) <= budget
        assert mb.per_token["old_logprobs"].dtype == torch.float64
        assert mb.per_token["response_mask"].dtype == torch.bool
        for b, i in enumerate(mb.seq_index.tolist()):
            s, e = int(mb.cu_seqlens[b]), int(mb.cu_seqlens[b + 1])
            assert mb.input_ids[s:e].tolist() == ids[i]
            assert mb.position_ids[s:e].tolist() == list(range(lengths[i]))
            assert mb.per_sequence["rewards"][b] == per_seq["rewards"][i]
            assert mb.per_sequence["group_ids"][b] == per_seq["group_ids"][i]
    # A per-token result computed on each micro-batch comes back to the original sequences exactly.
    back = scatter_back(mbs, [mb.per_token["old_logprobs"] * 2 for mb in mbs], len(lengths))
    for i, t in enumerate(back):
        assert torch.equal(t, per_token["old_logprobs"][i] * 2)
    ids_back = scatter_back(mbs, [mb.input_ids for mb in mbs], len(lengths))
    assert [t.tolist() for t in ids_back] == ids


def test_pack_sequences_subset_and_unpack() -> None:
    ids = [[1, 2, 3], [4], [5, 6]]
    mb = pack_sequences(ids, indices=[2, 0])
    assert mb.input_ids.tolist() == [5, 6, 1, 2, 3]
    assert mb.cu_seqlens.tolist() == [0, 2, 5]
    assert mb.seqlens().tolist() == [2, 3]
    assert mb.seq_index.tolist() == [2, 0]
    assert [t.tolist() for t in unpack(mb.input_ids, mb.cu_seqlens)] == [[5, 6], [1, 2, 3]]


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"per_token": {"mask": [[1, 1, 1], [1]]}}, r"per_token\['mask'\]\[1\]: expected 2 values"),
        ({"per_token": {"mask": [[1, 1, 1]]}}, r"per_token\['mask'\]: expected 2 arrays"),
        ({"per_sequence": {"rewards": [1.0]}}, r"per_sequence\['rewards'\]: expected 2 values"),
    ],
)
def test_pack_errors(kwargs: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        pack_sequences([[1, 2, 3], [4, 5]], **kwargs)


def test_pack_rejects_empty_sequence() -> None:
    with pytest.raises(ValueError, match=r"token_ids\[1\]: empty sequence"):
        pack_sequences([[1], []])


def test_scatter_back_detects_missing_and_duplicates() -> None:
    mbs = pack_micro_batches([[1, 2], [3]], 2)
    with pytest.raises(ValueError, match="in none of the micro-batches"):
        scatter_back(mbs[:1], [mbs[0].input_ids], 2)
    with pytest.raises(ValueError, match="appears twice"):
        scatter_back([mbs[0], mbs[0]], [mbs[0].input_ids, mbs[0].input_ids], 2)
    with pytest.raises(ValueError, match="expected 2 tensors"):
        scatter_back(mbs, [mbs[0].input_ids], 2)


@settings(max_examples=100, deadline=None)
@given(st.lists(st.integers(0, 12), min_size=1, max_size=8), st.integers(0, 12), st.booleans(),
       st.integers(0, 2**16))
def test_padded_packed_round_trip(lengths: list[int], extra: int, left: bool, seed: int) -> None:
    b, length = len(lengths), max(lengths) + extra
    mask = torch.zeros(b, length, dtype=torch.long)
    for i, n in enumerate(lengths):
        if left:
            mask[i, length - n:] = 1
        elif n:
            mask[i, :n] = 1
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(b, length, 3, generator=g)
    packed, index = padded_to_packed(x, mask)
    assert packed.shape == (sum(lengths), 3)
    assert index.cu_seqlens.dtype == torch.int32
    assert index.cu_seqlens.tolist() == [0, *torch.cumsum(torch.tensor(lengths), 0).tolist()]
    back = packed_to_padded(packed, index, pad_value=-7.0)
    assert torch.equal(back[mask.bool()], x[mask.bool()])
    assert bool((back[~mask.bool()] == -7.0).all())
    for i, seq in enumerate(unpack(packed, index.cu_seqlens)):
        assert torch.equal(seq, x[i][mask[i].bool()])


def test_padded_to_packed_shape_error() -> None:
    with pytest.raises(ValueError, match="attention_mask: expected shape"):
        padded_to_packed(torch.zeros(2, 5), torch.ones(2, 4))


@pytest.mark.parametrize(("groups", "group_size", "num_mini"), [(6, 2, 2), (5, 3, 2), (4, 1, 4), (3, 5, 1)])
def test_plan_mini_batches_keeps_groups_and_order(groups: int, group_size: int, num_mini: int) -> None:
    n = groups * group_size
    lengths = [(7 * i) % 11 + 1 for i in range(n)]
    ids = [[i] * lengths[i] for i in range(n)]
    minis = plan_mini_batches(ids, num_mini, 12, per_sequence={"group_ids": torch.arange(n) // group_size},
                              group_size=group_size)
    assert len(minis) == num_mini
    seen = []
    for mini in minis:
        idx = sorted(i for mb in mini for i in mb.seq_index.tolist())
        assert idx == list(range(idx[0], idx[-1] + 1))  # a contiguous run of the caller's sequences
        assert len(idx) % group_size == 0 and idx[0] % group_size == 0  # whole groups only
        assert all(mb.num_tokens <= 12 for mb in mini)
        seen += idx
    assert seen == list(range(n))
    sizes = [sum(mb.num_sequences for mb in mini) // group_size for mini in minis]
    assert max(sizes) - min(sizes) <= 1


@pytest.mark.parametrize(
    ("n", "num_mini", "group_size", "match"),
    [(6, 4, 2, r"num_mini_batches: expected 1\.\.3"), (5, 1, 2, "group_size: expected a positive divisor"),
     (4, 0, 1, r"num_mini_batches: expected 1\.\.4")],
)
def test_plan_mini_batches_errors(n: int, num_mini: int, group_size: int, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        plan_mini_batches([[1]] * n, num_mini, 8, group_size=group_size)
