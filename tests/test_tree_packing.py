"""Tree packing: the token tree and its index map reproduce the flat layout exactly; packs hold every sequence
once within the node budget; shared prefixes are stored once."""

from __future__ import annotations

import random

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from tree_helpers import random_tree_sequences

from rexrag_fast.train.packing import (
    build_token_tree,
    pack_sequences,
    pack_tree,
    pack_tree_micro_batches,
    plan_mini_batches,
    plan_tree_packs,
    scatter_back,
    tree_sharing,
)


def ancestors_or_self(parent: list[int], i: int) -> set[int]:
    out = set()
    while i >= 0:
        out.add(i)
        i = parent[i]
    return out


@settings(max_examples=150, deadline=None)
@given(st.integers(0, 2**31 - 1), st.sampled_from([2, 5, 50]))
def test_token_tree_reproduces_flat_layout(seed: int, vocab: int) -> None:
    seqs = random_tree_sequences(random.Random(seed), vocab)
    flat = pack_sequences(seqs)
    tree = build_token_tree(seqs)
    node = tree.token_node
    assert tree.num_nodes == len({tuple(s[:k]) for s in seqs for k in range(1, len(s) + 1)})  # distinct prefixes
    assert torch.equal(tree.input_ids[node], flat.input_ids)
    assert torch.equal(tree.position_ids[node], flat.position_ids)
    # The previous token of a sequence is its token's parent; sequence starts are roots.
    starts = flat.cu_seqlens[:-1].long()
    expected_parent = torch.cat([torch.tensor([-1]), node[:-1]])
    expected_parent[starts] = -1
    assert torch.equal(tree.parent[node], expected_parent)
    # Preorder: parents precede children; the subtree ranges are exactly the descendants.
    parent = tree.parent.tolist()
    assert all(p < i for i, p in enumerate(parent))
    end = tree.subtree_end.tolist()
    for i in range(tree.num_nodes):
        assert ancestors_or_self(parent, i) == {j for j in range(tree.num_nodes) if j <= i < end[j]}
    assert all(tree.position_ids[i] == len(ancestors_or_self(parent, i)) - 1 for i in range(tree.num_nodes))


@settings(max_examples=150, deadline=None)
@given(st.integers(0, 2**31 - 1), st.integers(0, 30))
def test_tree_packs_cover_every_sequence_within_budget(seed: int, slack: int) -> None:
    rng = random.Random(seed)
    seqs = random_tree_sequences(rng, 5) + random_tree_sequences(rng, 5)
    budget = max(len(s) for s in seqs) + slack
    packs = plan_tree_packs(seqs, budget)
    assert sorted(i for p in packs for i in p) == list(range(len(seqs)))
    nodes = [build_token_tree([seqs[i] for i in p]).num_nodes for p in packs]
    assert all(n <= budget for n in nodes)
    total = sum(len(s) for s in seqs)
    assert tree_sharing(seqs, budget) == pytest.approx(1 - sum(nodes) / total)
    # One pack when the whole tree fits the budget: nothing repeated.
    whole = build_token_tree(seqs).num_nodes
    assert len(plan_tree_packs(seqs, max(whole, budget))) == 1
    assert tree_sharing(seqs, max(whole, budget)) == pytest.approx(1 - whole / total)


def test_split_tree_repeats_the_shared_prefix() -> None:
    prompt = list(range(10))
    seqs = [prompt + [100 + i] * 6 for i in range(4)]  # 4 branches of 6 after a 10-token prompt
    packs = plan_tree_packs(seqs, 22)  # the prompt + 2 branches fit, not 3
    assert packs == [[0, 1], [2, 3]]
    for p in packs:
        assert build_token_tree([seqs[i] for i in p]).num_nodes == 22
    assert tree_sharing(seqs, 22) == pytest.approx(1 - 44 / 64)
    assert tree_sharing(seqs, 64) == pytest.approx(1 - 34 / 64)
    with pytest.raises(ValueError, match="exceeds the micro-batch token budget"):
        plan_tree_packs(seqs, 15)


def test_tree_pack_round_trip_and_mini_batches() -> None:
    rng = random.Random(7)
    seqs = [s for _ in range(3) for s in random_tree_sequences(rng, 9, max_sequences=6)]
    group_ids = [0] * 8 + [1] * (len(seqs) - 8)
    lp = [torch.randn(len(s)) for s in seqs]
    budget = max(len(s) for s in seqs) + 5
    mbs = pack_tree_micro_batches(seqs, budget, per_token={"x": lp})
    assert all(mb.tree is not None and mb.processed_tokens <= budget for mb in mbs)
    back = scatter_back(mbs, [mb.per_token["x"] for mb in mbs], len(seqs))
    assert all(torch.equal(a, b) for a, b in zip(back, lp))
    one = pack_tree(seqs, per_token={"x": lp}, indices=[3, 1])
    assert one.seq_index.tolist() == [3, 1]
    assert torch.equal(one.tree.input_ids[one.tree.token_node], one.input_ids)
    flat = plan_mini_batches(seqs, 2, budget, group_ids=group_ids)
    tree = plan_mini_batches(seqs, 2, budget, group_ids=group_ids, tree=True)
    for f, t in zip(flat, tree):
        assert sorted(i for mb in f for i in mb.seq_index.tolist()) == \
            sorted(i for mb in t for i in mb.seq_index.tolist())
        assert sum(mb.processed_tokens for mb in t) <= sum(mb.num_tokens for mb in f)
