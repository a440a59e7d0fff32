"""Continuous batching: which sequences run in the next forward, under a token budget and the free blocks.

Each step is either a prefill step (waiting sequences admitted in order while the token budget, max_num_seqs
and the blocks allow; the first one may be split into chunks if it alone exceeds the budget) or, when nothing
waits or nothing more can be admitted, a decode step of every running sequence (one token each). When a
running sequence needs a block and none is free even after evicting unlocked cached prefixes, the newest
running sequence is preempted: its blocks go back (computed ones into the prefix cache) and it returns to the
front of the queue to be recomputed later. The oldest sequence can always take the whole pool, which the
engine guarantees is large enough for any single request, so the loop always makes progress.
"""

from __future__ import annotations

from collections import deque

from rexrag_fast.engine.block_manager import BlockManager
from rexrag_fast.engine.sequence import Sequence, Status


class Scheduler:
    """Queues of waiting and running sequences and the choice of each step's batch."""

    def __init__(self, block_manager: BlockManager, max_num_batched_tokens: int, max_num_seqs: int) -> None:
        self.blocks = block_manager
        self.max_num_batched_tokens = max_num_batched_tokens
        self.max_num_seqs = min(max_num_seqs, max_num_batched_tokens)  # a decode step feeds 1 token per seq
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        self.num_preemptions = 0
        self.num_cached_tokens = 0

    def add(self, seq: Sequence) -> None:
        self.waiting.append(seq)

    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    def schedule(self) -> tuple[list[Sequence], bool]:
        """(sequences of the next forward, is_prefill); each has num_scheduled set (tokens to compute)."""
        batch = self._schedule_prefill()
        if batch:
            return batch, True
        return self._schedule_decode(), False

    def _schedule_prefill(self) -> list[Sequence]:
        batch: list[Sequence] = []
        budget = self.max_num_batched_tokens
        while self.waiting and budget > 0:
            # sequences of this batch that finished their prefill are in self.running already
            partial = sum(1 for b in batch if b.status is not Status.RUNNING)
            if len(self.running) + partial >= self.max_num_seqs:
                break
            seq = self.waiting[0]
            if batch and not seq.block_table and self._waits_for_shared_prefix(seq, batch):
                break  # admitted next step, when the batch's blocks of their common prefix are cached
            if not seq.block_table:
                if not self.blocks.admit(seq):
                    break
                self.num_cached_tokens += seq.num_computed
            remaining = len(seq) - seq.num_computed
            if remaining > budget and batch:
                break  # only the first sequence of a step is chunked
            seq.num_scheduled = min(remaining, budget)
            budget -= seq.num_scheduled
            batch.append(seq)
            if seq.num_scheduled == remaining:
                self.waiting.popleft()
                seq.status = Status.RUNNING
                self.running.append(seq)
        return batch

    def _waits_for_shared_prefix(self, seq: Sequence, batch: list[Sequence]) -> bool:
        """True when a sequence of this prefill batch computes a full block of seq's prompt prefix that is not
        cached yet: one step later (after BlockManager.publish) seq reuses it instead of computing a copy."""
        if not self.blocks.enable_prefix_caching:
            return False
        bs = self.blocks.block_size
        cached = self.blocks.cached_prefix_blocks(seq)
        for other in batch:
            n = bs * (cached + 1)
            if len(other) >= n and other.token_ids[:n] == seq.token_ids[:n] and len(seq) > n:
                return True
        return False

    def _schedule_decode(self) -> list[Sequence]:
        batch: list[Sequence] = []
        i = 0
        while i < len(self.running):
            seq = self.running[i]
            while not self.blocks.ensure_slot(seq):
                victim = self.running[-1]
                self._preempt(victim)
                if victim is seq:
                    break
            else:
                seq.num_scheduled = 1
                batch.append(seq)
                i += 1
        assert batch or self.waiting, "scheduler made no progress"
        return batch

    def _preempt(self, seq: Sequence) -> None:
        self.running.remove(seq)
        self.blocks.release(seq)
        seq.status = Status.WAITING
        self.waiting.appendleft(seq)
        self.num_preemptions += 1

    def finish(self, seq: Sequence) -> None:
        """Take a finished sequence out of the running set and hand its blocks to the prefix cache."""
        self.running.remove(seq)
        self.blocks.release(seq)
        seq.status = Status.FINISHED


    def abort_all(self) -> None:
        """Drop every waiting and running sequence, returning their blocks (computed ones to the cache)."""
        for seq in list(self.running) + list(self.waiting):
            if seq.block_table:
                self.blocks.release(seq)
            seq.status = Status.FINISHED
        self.running.clear()
        self.waiting.clear()
