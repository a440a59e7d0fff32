"""CUDA graphs for batched decode: one graph per batch-size bucket, captured once, replayed every step.

A decode step of B sequences is launch-bound (layers x ~10 small kernels each), so the whole decode
forward is recorded once per bucket size (1, 2, 4, 8, then multiples of 16 up to max_batch, as nano-vllm and
vLLM do) over static input buffers and replayed: a step copies its inputs into the first B rows, pads the
rows up to the bucket, replays the bucket's graph and returns the first B rows of its output. Batches above
the largest bucket, or with a block table wider than the static one, run eagerly.

Padding rows are inert: input id 0, position 0, slot `pad_slot` (a scratch slot the block allocator never
hands out, so their K/V writes land where nobody reads), block table all 0 and context length 0 (decode
attention reads no keys for them). Their outputs are computed and dropped.

A graph holds the addresses of everything it reads: the weights must be updated in place and the KV pool
never reallocated after `capture()`; the returned rows are a view of the graph's static output, valid
until the next call.
"""

from __future__ import annotations

import bisect
import dataclasses
from collections.abc import Callable

import torch

# forward(input_ids [B] int64, positions [B] int64, slot_mapping [B] int64, block_tables [B, max_blocks] int32,
#         context_lens [B] int32) -> [B, ...] (logits or hidden states)
DecodeForward = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]

SMALL_BUCKETS = (1, 2, 4, 8)
BUCKET_STEP = 16


def bucket_sizes(max_batch: int) -> list[int]:
    """Captured batch sizes: 1, 2, 4, 8, then every multiple of 16 up to max_batch, and max_batch itself."""
    if max_batch < 1:
        raise ValueError(f"max_batch: expected >= 1, got {max_batch}")
    sizes = [b for b in SMALL_BUCKETS if b <= max_batch] + list(range(BUCKET_STEP, max_batch + 1, BUCKET_STEP))
    if sizes[-1] != max_batch:
        sizes.append(max_batch)
    return sizes


def bucket_for(batch: int, buckets: list[int]) -> int | None:
    """The smallest bucket >= batch (buckets sorted), or None when batch is above the largest."""
    i = bisect.bisect_left(buckets, batch)
    return buckets[i] if i < len(buckets) else None


@dataclasses.dataclass
class DecodeInputs:
    """Static decode inputs shared by every bucket's graph; bucket b reads the first b rows.

    input_ids, positions, slot_mapping [max_batch] int64; block_tables [max_batch, max_blocks] int32;
    context_lens [max_batch] int32.
    """

    input_ids: torch.Tensor
    positions: torch.Tensor
    slot_mapping: torch.Tensor
    block_tables: torch.Tensor
    context_lens: torch.Tensor

    @classmethod
    def allocate(cls, max_batch: int, max_blocks: int, device: torch.device) -> DecodeInputs:
        def rows(dtype: torch.dtype) -> torch.Tensor:
            return torch.zeros(max_batch, dtype=dtype, device=device)

        return cls(rows(torch.int64), rows(torch.int64), rows(torch.int64),
                   torch.zeros(max_batch, max_blocks, dtype=torch.int32, device=device), rows(torch.int32))

    def fill(self, input_ids: torch.Tensor, positions: torch.Tensor, slot_mapping: torch.Tensor,
             block_tables: torch.Tensor, context_lens: torch.Tensor, padded: int, pad_slot: int) -> None:
        """Copy a batch of B rows (block_tables [B, w], w <= max_blocks) into rows [:B]; pad rows [B:padded]."""
        batch, width = block_tables.shape
        self.input_ids[:batch].copy_(input_ids)
        self.positions[:batch].copy_(positions)
        self.slot_mapping[:batch].copy_(slot_mapping)
        self.block_tables[:batch, :width].copy_(block_tables)
        self.block_tables[:batch, width:].zero_()
        self.context_lens[:batch].copy_(context_lens)
        self.pad(batch, padded, pad_slot)

    def pad(self, start: int, end: int, pad_slot: int) -> None:
        """Make rows [start:end] inert padding (see the module docstring)."""
        self.input_ids[start:end].zero_()
        self.positions[start:end].zero_()
        self.slot_mapping[start:end].fill_(pad_slot)
        self.block_tables[start:end].zero_()
        self.context_lens[start:end].zero_()

    def rows(self, n: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """The first n rows of every buffer, in the argument order of a DecodeForward."""
        return (self.input_ids[:n], self.positions[:n], self.slot_mapping[:n], self.block_tables[:n],
                self.context_lens[:n])


class DecodeGraphRunner:
    """Runs a DecodeForward through per-bucket CUDA graphs (after `capture()`), eagerly otherwise.

    Before `capture()` (and on a CPU) `run` takes the same padded path without graphs, so the padding is
    exercised everywhere; `capture()` needs CUDA.
    """

    def __init__(self, forward: DecodeForward, *, max_batch: int, max_blocks: int, pad_slot: int,
                 device: torch.device) -> None:
        if max_blocks < 1:
            raise ValueError(f"max_blocks: expected >= 1 (block-table width of the longest sequence), got {max_blocks}")
        if pad_slot < 0:
            raise ValueError(f"pad_slot: expected a KV-pool slot >= 0 reserved for padding rows, got {pad_slot}")
        self.forward = forward
        self.buckets = bucket_sizes(max_batch)
        self.max_blocks = max_blocks
        self.pad_slot = pad_slot
        self.device = torch.device(device)
        self.inputs = DecodeInputs.allocate(max_batch, max_blocks, self.device)
        self.graphs: dict[int, torch.cuda.CUDAGraph] = {}
        self.outputs: dict[int, torch.Tensor] = {}

    @property
    def captured(self) -> bool:
        return bool(self.graphs)

    def capture(self) -> None:
        """Record one graph per bucket, largest first, all in one memory pool (a smaller graph reuses the
        larger one's blocks). Each bucket runs once eagerly first, on all-padding rows, so that lazy set-up
        (Triton compilation, cuBLAS workspaces) happens outside the graph."""
        if self.device.type != "cuda":
            raise RuntimeError(f"CUDA graphs need a CUDA device, the runner is on {self.device}")
        pool = None
        for size in reversed(self.buckets):
            self.inputs.pad(0, size, self.pad_slot)
            args = self.inputs.rows(size)
            self.forward(*args)
            torch.cuda.synchronize(self.device)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=pool):
                self.outputs[size] = self.forward(*args)
            pool = graph.pool() if pool is None else pool
            self.graphs[size] = graph
        torch.cuda.synchronize(self.device)

    def run(self, input_ids: torch.Tensor, positions: torch.Tensor, slot_mapping: torch.Tensor,
            block_tables: torch.Tensor, context_lens: torch.Tensor) -> torch.Tensor:
        """One decode step of B sequences (DecodeForward's arguments) -> the forward's output rows [:B].

        With graphs the result is a view of the bucket's static output, overwritten by the next call.
        """
        batch = input_ids.shape[0]
        size = bucket_for(batch, self.buckets)
        if size is None or block_tables.shape[1] > self.max_blocks:
            return self.forward(input_ids, positions, slot_mapping, block_tables, context_lens)
        self.inputs.fill(input_ids, positions, slot_mapping, block_tables, context_lens, size, self.pad_slot)
        if self.graphs:
            self.graphs[size].replay()
            out = self.outputs[size]
        else:
            out = self.forward(*self.inputs.rows(size))
        return out[:batch]
