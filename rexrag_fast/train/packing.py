"""The one packer: trajectories into varlen micro-batches under a token budget, mini-batches of whole
groups, and the way back.

A trajectory is a list of token ids plus per-token arrays of the same length (response mask, old log-probs,
probe log-probs, ...) and per-sequence values (reward, group id). A packed micro-batch concatenates whole
trajectories along one token axis:

    input_ids [T], cu_seqlens [B+1] int32 (cu_seqlens[0] = 0, cu_seqlens[b+1] - cu_seqlens[b] = len_b),
    position_ids [T] (0..len_b-1 inside each sequence), per-token arrays [T], per-sequence arrays [B],
    seq_index [B] (each sequence's position in the caller's list).

Micro-batches are chosen by first-fit decreasing on lengths: sequences sorted by length (longest first,
ties by original index), each put into the first micro-batch with room for it, a new one opened otherwise.
The plan depends only on the lengths and the budget, so every rank and every rerun packs identically.

Mini-batches (`split_mini_batches`, `plan_mini_batches`): whole groups, in order of first appearance, dealt
as evenly as possible (earlier mini-batches take the extra ones), each packed into micro-batches as above.
`pack_trajectories` packs agent trajectories with their loss mask and behaviour log-probs.

Tree packs (`pack_tree`, `tree=True` in `plan_mini_batches`): the same flat layout plus the micro-batch's
`TokenTree` (train/token_tree.py: each shared token once, depth positions, ancestor ranges, the index map
`token_node` from every flat token to its node); per-token results come back to the flat layout through
`token_node`, so the loss reads the flat per_token arrays unchanged.

The padded layout `[B, L]` with an attention mask converts to the packed layout and back with
`padded_to_packed` / `packed_to_padded` (left or right padding, any mask whose valid tokens are the ones kept).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from rexrag_fast.agent.trajectory import LOSS_COMPONENTS, Trajectory
from rexrag_fast.train.token_tree import (
    TokenTree,
    build_token_tree,
    check_budget,
    plan_tree_packs,
    tree_sharing,
)


@dataclass
class PackedBatch:
    """One varlen micro-batch. Shapes: T = total tokens, B = sequences. `tree` is set on a tree pack."""

    input_ids: torch.Tensor  # [T] int64
    cu_seqlens: torch.Tensor  # [B+1] int32
    position_ids: torch.Tensor  # [T] int64
    seq_index: torch.Tensor  # [B] int64, index of each sequence in the unpacked list
    per_token: dict[str, torch.Tensor] = field(default_factory=dict)  # each [T]
    per_sequence: dict[str, torch.Tensor] = field(default_factory=dict)  # each [B]
    tree: TokenTree | None = None

    @property
    def num_tokens(self) -> int:
        """Tokens of the flat layout (what the loss counts)."""
        return int(self.input_ids.numel())

    @property
    def processed_tokens(self) -> int:
        """Tokens a forward runs over: the tree's nodes on a tree pack, else the flat tokens."""
        return self.tree.num_nodes if self.tree is not None else self.num_tokens

    @property
    def num_sequences(self) -> int:
        return int(self.cu_seqlens.numel()) - 1

    def seqlens(self) -> torch.Tensor:
        """[B] int32 lengths."""
        return self.cu_seqlens[1:] - self.cu_seqlens[:-1]

    def to(self, device: torch.device | str) -> PackedBatch:
        """A copy with every tensor on `device`."""
        return PackedBatch(
            input_ids=self.input_ids.to(device),
            cu_seqlens=self.cu_seqlens.to(device),
            position_ids=self.position_ids.to(device),
            seq_index=self.seq_index.to(device),
            per_token={k: v.to(device) for k, v in self.per_token.items()},
            per_sequence={k: v.to(device) for k, v in self.per_sequence.items()},
            tree=self.tree.to(device) if self.tree is not None else None,
        )


def first_fit_decreasing(lengths: Sequence[int], max_tokens: int) -> list[list[int]]:
    """Group sequence indices into bins of total length <= `max_tokens`, first-fit decreasing.

    lengths: [N] positive ints. Returns bins in the order they were opened; inside a bin, indices in the order
    they were placed (longest first). Deterministic: ties in length are broken by the smaller index.
    """
    lens = check_budget(lengths, max_tokens)
    order = sorted(range(len(lens)), key=lambda i: (-lens[i], i))
    bins: list[list[int]] = []
    room: list[int] = []
    for i in order:
        for b, free in enumerate(room):
            if lens[i] <= free:
                bins[b].append(i)
                room[b] -= lens[i]
                break
        else:
            bins.append([i])
            room.append(max_tokens - lens[i])
    return bins


def _as_1d(x: Any, dtype: torch.dtype | None, name: str) -> torch.Tensor:
    t = torch.as_tensor(np.asarray(x) if not isinstance(x, torch.Tensor) else x)
    if t.dim() != 1:
        raise ValueError(f"{name}: expected a 1-D sequence, got shape {list(t.shape)}")
    return t.to(dtype) if dtype is not None else t


def pack_sequences(
    token_ids: Sequence[Sequence[int] | torch.Tensor],
    per_token: Mapping[str, Sequence[Any]] | None = None,
    per_sequence: Mapping[str, Sequence[Any] | torch.Tensor] | None = None,
    indices: Sequence[int] | None = None,
) -> PackedBatch:
    """Concatenate the sequences `indices` (default: all, in order) into one PackedBatch.

    token_ids: N sequences of token ids; per_token[k]: N arrays, the i-th as long as token_ids[i];
    per_sequence[k]: [N] values. Output per-token arrays keep their input dtype.
    """
    per_token = dict(per_token or {})
    per_sequence = dict(per_sequence or {})
    n = len(token_ids)
    for k, v in per_token.items():
        if len(v) != n:
            raise ValueError(f"per_token[{k!r}]: expected {n} arrays (one per sequence), got {len(v)}")
    seq_vals = {}
    for k, v in per_sequence.items():
        t = _as_1d(v, None, f"per_sequence[{k!r}]")
        if t.numel() != n:
            raise ValueError(f"per_sequence[{k!r}]: expected {n} values (one per sequence), got {t.numel()}")
        seq_vals[k] = t
    idx = list(range(n)) if indices is None else [int(i) for i in indices]
    if not idx:
        raise ValueError("pack_sequences: no sequences to pack")
    ids = [_as_1d(token_ids[i], torch.long, f"token_ids[{i}]") for i in idx]
    lens = [t.numel() for t in ids]
    for i, length in zip(idx, lens):
        if length == 0:
            raise ValueError(f"token_ids[{i}]: empty sequence")
    tok = {}
    for k, arrays in per_token.items():
        parts = []
        for i, length in zip(idx, lens):
            t = _as_1d(arrays[i], None, f"per_token[{k!r}][{i}]")
            if t.numel() != length:
                raise ValueError(
                    f"per_token[{k!r}][{i}]: expected {length} values (the length of token_ids[{i}]), "
                    f"got {t.numel()}"
                )
            parts.append(t)
        tok[k] = torch.cat(parts)
    cu = torch.zeros(len(idx) + 1, dtype=torch.int32)
    cu[1:] = torch.cumsum(torch.tensor(lens, dtype=torch.int64), 0).to(torch.int32)
    index = torch.tensor(idx, dtype=torch.long)
    return PackedBatch(
        input_ids=torch.cat(ids),
        cu_seqlens=cu,
        position_ids=torch.cat([torch.arange(length, dtype=torch.long) for length in lens]),
        seq_index=index,
        per_token=tok,
        per_sequence={k: v[index] for k, v in seq_vals.items()},
    )


def pack_micro_batches(
    token_ids: Sequence[Sequence[int] | torch.Tensor],
    max_tokens: int,
    per_token: Mapping[str, Sequence[Any]] | None = None,
    per_sequence: Mapping[str, Sequence[Any] | torch.Tensor] | None = None,
) -> list[PackedBatch]:
    """Split N sequences into PackedBatches of at most `max_tokens` tokens each (first-fit decreasing)."""
    plan = first_fit_decreasing([len(t) for t in token_ids], max_tokens)
    return [pack_sequences(token_ids, per_token, per_sequence, indices=b) for b in plan]


def pack_tree(
    token_ids: Sequence[Sequence[int] | torch.Tensor],
    per_token: Mapping[str, Sequence[Any]] | None = None,
    per_sequence: Mapping[str, Sequence[Any] | torch.Tensor] | None = None,
    indices: Sequence[int] | None = None,
) -> PackedBatch:
    """`pack_sequences` plus the TokenTree of the packed sequences (`batch.tree`, token_node over its [T])."""
    batch = pack_sequences(token_ids, per_token, per_sequence, indices)
    batch.tree = build_token_tree([token_ids[i] for i in batch.seq_index.tolist()])
    return batch


def pack_tree_micro_batches(
    token_ids: Sequence[Sequence[int] | torch.Tensor],
    max_tokens: int,
    per_token: Mapping[str, Sequence[Any]] | None = None,
    per_sequence: Mapping[str, Sequence[Any] | torch.Tensor] | None = None,
) -> list[PackedBatch]:
    """Tree packs (`plan_tree_packs`) of N sequences, each with at most `max_tokens` tree nodes."""
    return [pack_tree(token_ids, per_token, per_sequence, indices=b) for b in plan_tree_packs(token_ids, max_tokens)]


def split_mini_batches(group_ids: Sequence[int], num_mini_batches: int) -> list[list[int]]:
    """Sequence indices of each mini-batch: whole groups (in order of first appearance) dealt as evenly as
    possible, earlier mini-batches taking the extra ones. REX-RAG probes travel with their source's group."""
    groups: dict[int, list[int]] = {}
    for i, g in enumerate(group_ids):
        groups.setdefault(int(g), []).append(i)
    members = list(groups.values())
    if not 1 <= num_mini_batches <= len(members):
        raise ValueError(f"num_mini_batches: expected 1..{len(members)} (the number of groups), got "
                         f"{num_mini_batches}")
    q, m = divmod(len(members), num_mini_batches)
    out, start = [], 0
    for k in range(num_mini_batches):
        count = q + (1 if k < m else 0)
        out.append([i for grp in members[start:start + count] for i in grp])
        start += count
    return out


def plan_mini_batches(
    token_ids: Sequence[Sequence[int] | torch.Tensor],
    num_mini_batches: int,
    max_tokens: int,
    per_token: Mapping[str, Sequence[Any]] | None = None,
    per_sequence: Mapping[str, Sequence[Any] | torch.Tensor] | None = None,
    group_size: int = 1,
    *,
    group_ids: Sequence[int] | None = None,
    tree: bool = False,
) -> list[list[PackedBatch]]:
    """Split N sequences into `num_mini_batches` mini-batches of whole groups (`split_mini_batches`), each
    packed into micro-batches of at most `max_tokens` tokens. Groups are `group_ids` [N] when given, else
    runs of `group_size` consecutive sequences (one prompt's n responses; verl's ppo_mini_batch_size in
    prompts is N / group_size / num_mini_batches). seq_index of every micro-batch refers to the caller's list.
    tree: tree packs (`plan_tree_packs`, at most `max_tokens` tree nodes each) instead of flat ones.
    """
    n = len(token_ids)
    if group_ids is None:
        if group_size < 1 or n % group_size:
            raise ValueError(f"group_size: expected a positive divisor of the {n} sequences, got {group_size}")
        group_ids = [i // group_size for i in range(n)]
    elif len(group_ids) != n:
        raise ValueError(f"group_ids: expected {n} values (one per sequence), got {len(group_ids)}")
    out = []
    for idx in split_mini_batches(group_ids, num_mini_batches):
        if tree:
            plan = plan_tree_packs([token_ids[i] for i in idx], max_tokens)
            out.append([pack_tree(token_ids, per_token, per_sequence, indices=[idx[j] for j in b]) for b in plan])
        else:
            plan = first_fit_decreasing([len(token_ids[i]) for i in idx], max_tokens)
            out.append([pack_sequences(token_ids, per_token, per_sequence, indices=[idx[j] for j in b])
                        for b in plan])
    return out


def pack_trajectories(
    trajectories: Sequence[Trajectory],
    rewards: Sequence[float] | None = None,
    group_ids: Sequence[int] | None = None,
    probe_logprobs: Sequence[Sequence[float] | None] | None = None,
) -> PackedBatch:
    """The packed varlen batch of DESIGN.md from B trajectories, T = sum of their lengths, in order.

    per_token: response_mask [T] bool (loss mask), component_mask [T] int8, old_logprobs [T] float32
    (behaviour log-probs, 0 off the response), probe_logprobs [T] float32 (-inf unless given per trajectory);
    per_sequence, when given: rewards [B] float32, group_ids [B] int64.
    """
    if not trajectories:
        raise ValueError("pack_trajectories: expected at least one trajectory")
    if probe_logprobs is not None and len(probe_logprobs) != len(trajectories):
        raise ValueError(f"probe_logprobs: expected {len(trajectories)} entries (one per trajectory), got "
                         f"{len(probe_logprobs)}")
    loss_values = torch.tensor(sorted(int(c) for c in LOSS_COMPONENTS), dtype=torch.int8)
    comps = [torch.tensor(t.components, dtype=torch.int8) for t in trajectories]
    per_token: dict[str, list[torch.Tensor]] = {
        "response_mask": [torch.isin(c, loss_values) for c in comps],
        "component_mask": comps,
        "old_logprobs": [torch.tensor(t.logprobs, dtype=torch.float32) for t in trajectories],
        "probe_logprobs": [torch.full((len(t),), -math.inf) if probe_logprobs is None or probe_logprobs[i] is None
                           else torch.tensor([float(x) for x in probe_logprobs[i]], dtype=torch.float32)
                           for i, t in enumerate(trajectories)],
    }
    per_sequence: dict[str, torch.Tensor] = {}
    if rewards is not None:
        per_sequence["rewards"] = torch.tensor([float(r) for r in rewards], dtype=torch.float32)
    if group_ids is not None:
        per_sequence["group_ids"] = torch.tensor([int(g) for g in group_ids], dtype=torch.int64)
    return pack_sequences([t.token_ids for t in trajectories], per_token, per_sequence)


def unpack(values: torch.Tensor, cu_seqlens: torch.Tensor) -> list[torch.Tensor]:
    """Split packed `values` [T, ...] into B per-sequence tensors by `cu_seqlens` [B+1]."""
    if values.shape[0] != int(cu_seqlens[-1]):
        raise ValueError(f"values: expected {int(cu_seqlens[-1])} rows (cu_seqlens[-1]), got {values.shape[0]}")
    lens = (cu_seqlens[1:] - cu_seqlens[:-1]).tolist()
    return list(torch.split(values, lens, dim=0))


def scatter_back(
    batches: Sequence[PackedBatch], values: Sequence[torch.Tensor], num_sequences: int
) -> list[torch.Tensor]:
    """Inverse of `pack_micro_batches` for a per-token result: values[j] [T_j] computed on batches[j] ->
    `num_sequences` per-sequence tensors in the caller's original order."""
    if len(batches) != len(values):
        raise ValueError(f"values: expected {len(batches)} tensors (one per micro-batch), got {len(values)}")
    out: list[torch.Tensor | None] = [None] * num_sequences
    for mb, v in zip(batches, values):
        for i, piece in zip(mb.seq_index.tolist(), unpack(v, mb.cu_seqlens)):
            if not 0 <= i < num_sequences or out[i] is not None:
                raise ValueError(f"sequence index {i} is out of range or appears twice across micro-batches")
            out[i] = piece
    missing = [i for i, t in enumerate(out) if t is None]
    if missing:
        raise ValueError(f"sequences {missing[:10]} are in none of the micro-batches")
    return out  # type: ignore[return-value]


@dataclass
class PackedIndex:
    """Where each packed token sits in the padded [B, L] layout."""

    flat_index: torch.Tensor  # [T] int64 positions in the flattened [B*L] layout
    cu_seqlens: torch.Tensor  # [B+1] int32
    batch_size: int
    seq_len: int


def padded_to_packed(padded: torch.Tensor, attention_mask: torch.Tensor) -> tuple[torch.Tensor, PackedIndex]:
    """[B, L, ...] with attention_mask [B, L] (1 = real token) -> (packed [T, ...], PackedIndex).

    Tokens keep their order inside each row, so left and right padding both work.
    """
    if attention_mask.dim() != 2 or padded.shape[:2] != attention_mask.shape:
        raise ValueError(
            f"attention_mask: expected shape [B, L] matching padded's first two dims {list(padded.shape[:2])}, "
            f"got {list(attention_mask.shape)}"
        )
    b, length = attention_mask.shape
    mask = attention_mask.bool()
    flat_index = torch.nonzero(mask.reshape(-1), as_tuple=False).squeeze(1)
    cu = torch.zeros(b + 1, dtype=torch.int32, device=padded.device)
    cu[1:] = torch.cumsum(mask.sum(1), 0).to(torch.int32)
    packed = padded.reshape(b * length, *padded.shape[2:])[flat_index]
    return packed, PackedIndex(flat_index, cu, b, length)


def packed_to_padded(packed: torch.Tensor, index: PackedIndex, pad_value: float = 0) -> torch.Tensor:
    """Inverse of `padded_to_packed`: packed [T, ...] -> [B, L, ...] with `pad_value` where the mask was 0."""
    if packed.shape[0] != index.flat_index.numel():
        raise ValueError(f"packed: expected {index.flat_index.numel()} rows, got {packed.shape[0]}")
    out = packed.new_full((index.batch_size * index.seq_len, *packed.shape[1:]), pad_value)
    out[index.flat_index] = packed
    return out.reshape(index.batch_size, index.seq_len, *packed.shape[1:])


# actor.tree_packing=auto packs prefix trees when they save at least this share of the flat tokens.
TREE_PACKING_MIN_SHARING = 0.2


def tree_packing_enabled(mode: str, token_ids: Sequence[Sequence[int]], max_tokens: int) -> bool:
    """actor.tree_packing: 'on', 'off', or 'auto' = when tree packs of these sequences under the micro-batch
    budget save at least TREE_PACKING_MIN_SHARING of their tokens. Decided per rank and pass: results are the
    same either way (up to float summation order), only the work differs."""
    if mode == "auto":
        return tree_sharing(token_ids, max_tokens) >= TREE_PACKING_MIN_SHARING
    return mode == "on"


def optimizer_steps_per_epoch(global_rows: int, mini_batch_rows: int, fewest_local_groups: int) -> int:
    """Mini-batches (optimizer steps) per PPO epoch of one step, derived identically on every rank:

        min(ceil(global_rows / mini_batch_rows), fewest_local_groups)

    global_rows: the step's kept trajectories on all ranks (originals and kept probes), counted as the
    reference counts rows after its n_agent copies (512 prompts x 5 = 2,560 rows / 256 = 10 steps; kept
    probes add their share, rounded up). A global mini-batch of R rows is about R / world rows per rank.
    Mini-batches here hold whole groups (a probe travels with its source's group), so their number is
    capped by the fewest groups any rank holds.
    """
    for name, v in (("global_rows", global_rows), ("mini_batch_rows", mini_batch_rows),
                    ("fewest_local_groups", fewest_local_groups)):
        if not isinstance(v, int) or v < 1:
            raise ValueError(f"{name}: expected a positive integer, got {v!r}")
    return min(-(-global_rows // mini_batch_rows), fewest_local_groups)
