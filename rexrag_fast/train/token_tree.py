"""The prefix tree of a set of token sequences: each shared token once, for tree-packed training passes.

Sequences that start alike (a GRPO group's shared prompt, a REX-RAG probe repeating its source up to the cut
answer) store each shared token once as one node:

    tree.input_ids [N], tree.position_ids [N] (depth), tree.parent [N] (-1 at roots),
    tree.subtree_end [N] (nodes in depth-first preorder: j is an ancestor-or-self of i iff j <= i < end[j]),
    tree.token_node [T] (the index map: the tree node of every token of the flat layout).

The model runs over the N nodes with attention restricted to ancestors. A tree pack holds at most
`max_tokens` NODES: sequences are taken in preorder of their last node and a pack is closed when the next
one would bring more new nodes than there is room, so a tree too big for one pack is split at a branch point
and its shared part repeated in the next pack (never dropped). `tree_sharing` is the share of tokens saved.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch


def check_budget(lengths: Sequence[int], max_tokens: int) -> list[int]:
    """lengths as ints, after checking each is in 1..max_tokens (a positive int)."""
    if isinstance(max_tokens, bool) or not isinstance(max_tokens, int) or max_tokens < 1:
        raise ValueError(f"max_tokens: expected a positive integer, got {max_tokens!r}")
    lens = [int(n) for n in lengths]
    for i, n in enumerate(lens):
        if n < 1:
            raise ValueError(f"lengths[{i}]: expected a positive length, got {n}")
        if n > max_tokens:
            raise ValueError(
                f"lengths[{i}] = {n} exceeds the micro-batch token budget max_tokens = {max_tokens}; "
                "raise the budget or truncate the trajectory"
            )
    return lens


@dataclass
class TokenTree:
    """The distinct prefixes of a micro-batch's sequences, each shared token once. N = nodes, T = flat tokens.

    Nodes are in depth-first preorder (children in order of first appearance), so a parent precedes its
    children and a node's subtree is the node range [i, subtree_end[i]).
    """

    input_ids: torch.Tensor  # [N] int64
    position_ids: torch.Tensor  # [N] int64, depth (0 at roots): the position of the token in its sequences
    parent: torch.Tensor  # [N] int64, -1 at roots
    subtree_end: torch.Tensor  # [N] int64, exclusive end of each node's subtree
    token_node: torch.Tensor  # [T] int64, the node of each flat token

    @property
    def num_nodes(self) -> int:
        return int(self.input_ids.numel())

    def to(self, device: torch.device | str) -> TokenTree:
        """A copy with every tensor on `device`."""
        return TokenTree(*(t.to(device) for t in (self.input_ids, self.position_ids, self.parent,
                                                  self.subtree_end, self.token_node)))


@dataclass
class _Trie:
    """Token-level trie of sequences: nodes in order of creation, and each sequence's path of nodes."""

    tokens: list[int]
    parents: list[int]
    preorder: list[int]  # the nodes in depth-first preorder (children in order of creation)
    paths: list[list[int]]


def _build_trie(seqs: Sequence[Sequence[int]]) -> _Trie:
    tokens: list[int] = []
    parents: list[int] = []
    children: list[dict[int, int]] = []
    roots: dict[int, int] = {}
    paths = []
    for seq in seqs:
        level, prev, path = roots, -1, []
        for tok in seq:
            node = level.get(tok)
            if node is None:
                node = len(tokens)
                level[tok] = node
                tokens.append(tok)
                parents.append(prev)
                children.append({})
            path.append(node)
            prev, level = node, children[node]
        paths.append(path)
    preorder: list[int] = []
    stack = list(reversed(roots.values()))
    while stack:
        node = stack.pop()
        preorder.append(node)
        stack.extend(reversed(children[node].values()))
    return _Trie(tokens, parents, preorder, paths)


def _as_token_lists(token_ids: Sequence[Sequence[int] | torch.Tensor]) -> list[list[int]]:
    return [t.tolist() if isinstance(t, torch.Tensor) else [int(x) for x in t] for t in token_ids]


def build_token_tree(token_ids: Sequence[Sequence[int] | torch.Tensor]) -> TokenTree:
    """The TokenTree of B sequences whose flat layout is their concatenation in the given order.

    token_ids: B non-empty sequences, T tokens in all. Two tokens share a node iff their sequences agree on
    every token up to and including them. Returns N <= T nodes with token_node [T] mapping the flat layout.
    """
    seqs = _as_token_lists(token_ids)
    for i, seq in enumerate(seqs):
        if not seq:
            raise ValueError(f"token_ids[{i}]: empty sequence")
    trie = _build_trie(seqs)
    n = len(trie.tokens)
    order = torch.tensor(trie.preorder, dtype=torch.long)
    new_id = torch.empty(n, dtype=torch.long)
    new_id[order] = torch.arange(n)
    parent_old = torch.tensor(trie.parents, dtype=torch.long)[order]
    parent = torch.where(parent_old >= 0, new_id[parent_old.clamp_min(0)], -1)
    par = parent.tolist()
    dep, sz = [0] * n, [1] * n
    for i in range(n):  # parents precede children in preorder
        if par[i] >= 0:
            dep[i] = dep[par[i]] + 1
    for i in range(n - 1, -1, -1):
        if par[i] >= 0:
            sz[par[i]] += sz[i]
    return TokenTree(
        input_ids=torch.tensor(trie.tokens, dtype=torch.long)[order],
        position_ids=torch.tensor(dep, dtype=torch.long),
        parent=parent,
        subtree_end=torch.arange(n) + torch.tensor(sz, dtype=torch.long),
        token_node=new_id[torch.tensor([node for path in trie.paths for node in path], dtype=torch.long)],
    )


def _tree_bins(token_ids: Sequence[Sequence[int] | torch.Tensor], max_tokens: int) -> tuple[list[list[int]], int]:
    """(bins of sequence indices, total nodes over the bins) of the greedy tree packing (`plan_tree_packs`)."""
    seqs = _as_token_lists(token_ids)
    check_budget([len(s) for s in seqs], max_tokens)
    trie = _build_trie(seqs)
    rank = {node: r for r, node in enumerate(trie.preorder)}
    order = sorted(range(len(seqs)), key=lambda i: (rank[trie.paths[i][-1]], i))
    bins: list[list[int]] = []
    total = 0
    held: set[int] = set()  # nodes of the open bin; closed under ancestors
    for i in order:
        path = trie.paths[i]
        k = len(path)
        while k > 0 and path[k - 1] not in held:
            k -= 1
        if not bins or len(held) + len(path) - k > max_tokens:
            bins.append([])
            held = set()
            k = 0
        bins[-1].append(i)
        held.update(path[k:])
        total += len(path) - k
    return bins, total


def plan_tree_packs(token_ids: Sequence[Sequence[int] | torch.Tensor], max_tokens: int) -> list[list[int]]:
    """Sequence indices of each tree pack: at most `max_tokens` distinct prefix tokens (tree nodes) per pack.

    Sequences are taken in depth-first order of their token tree (sequences sharing a prefix are neighbours);
    a pack is closed when the next sequence's new nodes do not fit, and the next pack repeats the shared part
    it needs. Every sequence (length <= max_tokens) lands in exactly one pack. Deterministic.
    """
    return _tree_bins(token_ids, max_tokens)[0]


def tree_sharing(token_ids: Sequence[Sequence[int] | torch.Tensor], max_tokens: int) -> float:
    """Share of the flat tokens that tree packing under `max_tokens` does not process: 1 - nodes / tokens."""
    total = sum(len(t) for t in token_ids)
    if total == 0:
        return 0.0
    return 1.0 - _tree_bins(token_ids, max_tokens)[1] / total
