"""The retrieval server's micro-batcher: concurrent requests' queries merged into one embedding + search call.

A single worker gathers waiting requests for up to `max_wait_ms` or until `max_batch_queries` queries wait,
embeds them in one call, searches once with the largest topk, and hands each request its part. A request larger
than a batch is cut into slices: each batch gives the waiting requests max-min fair shares of
`max_batch_queries` (`fair_shares`), so a one-query request waits for at most one batch behind a request of
thousands. If a batch's call fails, its requests are retried one by one, so only the culprit fails. After large
requests the worker hands freed heap back to the OS once idle (`release_free_memory`).
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import ctypes
import dataclasses
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from rexrag_fast.retrieval.local import LocalRetriever


@dataclasses.dataclass
class BatchingConfig:
    """Micro-batching. enabled=False embeds each request on its own (the one-request-per-call baseline), still
    in slices of at most max_batch_queries."""

    enabled: bool = True
    max_batch_queries: int = 256
    max_wait_ms: float = 5.0


@dataclasses.dataclass
class _Pending:
    queries: list[str]
    topk: int
    return_scores: bool
    future: asyncio.Future[list[list[dict[str, Any]]]]
    results: list[list[dict[str, Any]]] = dataclasses.field(default_factory=list)
    handed: int = 0  # queries[:handed] went into batches
    answered: int = 0

    @property
    def waiting(self) -> int:
        return len(self.queries) - self.handed


# (request, first query, end): queries[first:end] of a request, one part of a batch
_Part = tuple[_Pending, int, int]

_TRIM_AFTER_QUERIES = 4096  # hand memory back once idle after this many queries


def fair_shares(waiting: list[int], budget: int) -> list[int]:
    """Max-min fair split of `budget` queries over requests waiting with `waiting` [R] queries -> grants [R].

    Requests asking less than an equal share of what is left get all they ask; the others share the rest
    evenly; integer remainders go in arrival order. sum(grants) = min(budget, sum(waiting)).
    """
    grants = [0] * len(waiting)
    left = budget
    order = sorted(range(len(waiting)), key=lambda i: waiting[i])
    for rank, i in enumerate(order):
        share = left // (len(order) - rank)
        if waiting[i] > share:  # this one and every larger one get the equal share of what is left
            capped = order[rank:]
            for j in capped:
                grants[j] = share
            left -= share * len(capped)
            for j in sorted(capped)[:left]:
                grants[j] += 1
            break
        grants[i] = waiting[i]
        left -= waiting[i]
    return grants


class MicroBatcher:
    """Gathers concurrent retrieve calls into fair, bounded embedding + search calls on a worker thread."""

    def __init__(self, retriever: LocalRetriever, config: BatchingConfig) -> None:
        if config.max_batch_queries < 1 or config.max_wait_ms < 0:
            raise ValueError(f"bad BatchingConfig {config}: need max_batch_queries >= 1 and max_wait_ms >= 0")
        self.retriever = retriever
        self.config = config
        self.waiting: collections.deque[_Pending] = collections.deque()
        self.executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="retrieval-batch")
        self.batches = 0
        self.queries = 0
        self.pending_requests = 0  # submitted and not yet answered
        self.pending_queries = 0
        self._waiting_queries = 0  # not yet handed to a batch
        self._since_trim = 0
        self._task: asyncio.Task[None] | None = None
        self._arrived = asyncio.Event()

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._run())

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        self.executor.shutdown(wait=False, cancel_futures=True)

    async def submit(self, queries: list[str], topk: int, return_scores: bool) -> list[list[dict[str, Any]]]:
        """[Q] queries -> per query, its top-k hits (as LocalRetriever.retrieve with `return_scores`)."""
        future: asyncio.Future[list[list[dict[str, Any]]]] = asyncio.get_running_loop().create_future()
        pending = _Pending(queries, topk, return_scores, future, results=[[] for _ in queries])
        self.waiting.append(pending)
        self._waiting_queries += len(queries)
        self.pending_requests += 1
        self.pending_queries += len(queries)
        self._arrived.set()
        try:
            return await future
        finally:
            self.pending_requests -= 1
            self.pending_queries -= len(queries)

    async def _wait_for_work(self) -> None:
        while not self.waiting:
            self._arrived.clear()
            await self._arrived.wait()
        if not self.config.enabled:
            return
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.config.max_wait_ms / 1000.0
        while self._waiting_queries < self.config.max_batch_queries:
            remaining = deadline - loop.time()
            if remaining <= 0:
                break
            # Sleep until a request arrives or the deadline passes; not polling leaves the event loop's CPU to
            # the HTTP handlers.
            self._arrived.clear()
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self._arrived.wait(), remaining)

    def _take(self) -> list[_Part]:
        """The next batch: fair slices of the waiting requests; served ones that still wait go to the back."""
        live = [p for p in self.waiting if not p.future.done()]  # drop requests whose client went away
        self._waiting_queries = sum(p.waiting for p in live)
        if not self.config.enabled:
            live = live[:1]
        grants = fair_shares([p.waiting for p in live], self.config.max_batch_queries)
        parts: list[_Part] = []
        for p, n in zip(live, grants):
            if n:
                parts.append((p, p.handed, p.handed + n))
                p.handed += n
                self._waiting_queries -= n
        served = {id(p) for p, _, _ in parts}
        rest = [p for p in self.waiting if not p.future.done() and p.waiting]
        self.waiting = collections.deque([p for p in rest if id(p) not in served] +
                                         [p for p in rest if id(p) in served])
        return parts

    async def _retrieve(self, parts: list[_Part]) -> list[list[dict[str, Any]]]:
        queries = [q for p, a, b in parts for q in p.queries[a:b]]
        topk = max(p.topk for p, _, _ in parts)
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self.executor, self.retriever.retrieve, queries, topk, True)

    def _deliver(self, part: _Part, hits: list[list[dict[str, Any]]]) -> None:
        p, a, b = part
        if p.future.done():
            return
        # Best-first order makes the first k of the largest topk this request's top k.
        p.results[a:b] = [r[: p.topk] if p.return_scores else [hit["document"] for hit in r[: p.topk]] for r in hits]
        p.answered += b - a
        if p.answered == len(p.queries):
            p.future.set_result(p.results)

    async def _run(self) -> None:
        while True:
            await self._wait_for_work()
            parts = self._take()
            if not parts:
                continue
            try:
                results = await self._retrieve(parts)
            except Exception:
                # Retry each part on its own so that only the request that breaks retrieval fails.
                for part in parts:
                    try:
                        self._deliver(part, await self._retrieve([part]))
                        self.queries += part[2] - part[1]
                    except Exception as e:
                        if not part[0].future.done():
                            part[0].future.set_exception(e)
                continue
            self.batches += 1
            self.queries += len(results)
            self._since_trim += len(results)
            start = 0
            for part in parts:
                n = part[2] - part[1]
                self._deliver(part, results[start:start + n])
                start += n
            if not self.waiting and self._since_trim >= _TRIM_AFTER_QUERIES:
                self._since_trim = 0
                await asyncio.get_running_loop().run_in_executor(self.executor, release_free_memory)


def release_free_memory() -> None:
    """Hand the C heap's free pages back to the OS (glibc malloc_trim; a no-op elsewhere). Parsing and embedding
    a large request leaves freed arenas that glibc otherwise keeps for the life of the process."""
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6").malloc_trim(0)
