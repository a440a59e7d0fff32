"""Search-R1-compatible retrieval server (FastAPI + uvicorn) with fair micro-batching of concurrent requests.

    POST /retrieve {"queries": [str, ...], "topk": k, "return_scores": bool}
      -> {"result": [[{"document": {"id", "contents"}, "score": float}, ...], ...]}   (return_scores true)
      -> {"result": [[{"id", "contents"}, ...], ...]}                               (return_scores false)
    GET /health -> {"status": "ok", "documents": N, "embedder": ..., ...}

As in Search-R1's server: topk absent, null or 0 means the server's default (3), return_scores defaults to false,
and {"queries": []} is answered 200 {"result": []} (trainers post every turn, also when no rollout searched).

Batching. A single worker gathers waiting requests for up to `max_wait_ms` or until `max_batch_queries` queries
wait, embeds them in one call, searches once with the largest topk, and hands each request its part. A request
larger than a batch is cut into slices: each batch gives the waiting requests max-min fair shares of
`max_batch_queries` (a request asking less than an equal share gets all of it, the others split the rest), so a
one-query request waits for at most one batch behind a request of thousands of queries.

Guarantees.
- Batch invariance: a query's results (ids, order and scores, bit for bit) do not depend on what else is in its
  batch or on the server's load: the embedder computes each query in forwards of a fixed shape chosen by the
  query's own length (see embedder.py), and a flat faiss index scores each query row on its own. Checked bit
  for bit on CPU (bf16, fp32); on CUDA it rests on kernels being deterministic for a fixed shape.
- Failure isolation: if a batch's call fails, its requests are retried one by one, so only the request that
  breaks the embedder or the index gets a 500 and the others their results. Text that cannot be encoded as
  UTF-8 (a lone surrogate such as "\\ud800") is refused at parsing with 422.
- Bounded work per request (ServerLimits): queries, characters per query and per request, body bytes, topk.
  Over a limit: 413 or 422 naming the limit. Malformed input: 400 or 422 naming the problem; never a 500.
- Overload: past `max_pending_requests` requests or `max_pending_queries` queries in flight, a request is
  answered 503 with a Retry-After header at once instead of queueing without bound (the client retries 5xx).
- Connections: at most `max_connections` open (the next one gets 503 and is closed); a connection that has not
  sent a complete request head `header_timeout_s` after opening or after its last answer is closed (idle and
  slowloris clients), and a body not received within `body_timeout_s` gets 408.
- Memory: after a large request the worker hands freed heap back to the OS (glibc malloc_trim) once idle.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import ctypes
import dataclasses
import json
import socket
import threading
import time
from collections.abc import AsyncIterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import h11
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse

from rexrag_fast.retrieval.local import LocalRetriever


@dataclasses.dataclass
class ServerLimits:
    """Per-request and per-server limits; a request over any of them gets a 4xx/503 answer naming the limit.

    Defaults admit what a Search-R1 trainer sends in one rollout turn: every active query at once (512 prompts x
    5 samples = 2,560 queries) of up to a whole response each (500 tokens, a few thousand characters; the
    embedder reads the first 256 tokens), and ~400 characters per query on average over a request.
    """

    max_queries: int = 4096
    max_topk: int = 100
    max_query_chars: int = 8192
    max_request_chars: int = 1 << 20
    max_body_bytes: int = 8 << 20
    default_topk: int = 3
    max_pending_requests: int = 1024
    max_pending_queries: int = 16384
    retry_after_s: int = 1
    max_connections: int = 512
    header_timeout_s: float = 10.0
    body_timeout_s: float = 30.0

    def __post_init__(self) -> None:
        for name, value in dataclasses.asdict(self).items():
            if isinstance(value, bool) or not isinstance(value, (int, float)) or value <= 0 \
                    or (isinstance(value, int) and value < 1):
                raise ValueError(f"ServerLimits.{name} must be a positive number, got {value!r}")
        if self.default_topk > self.max_topk:
            raise ValueError(f"ServerLimits.default_topk ({self.default_topk}) exceeds max_topk ({self.max_topk})")
        if self.max_pending_queries < self.max_queries:
            raise ValueError(f"ServerLimits.max_pending_queries ({self.max_pending_queries}) is below max_queries "
                             f"({self.max_queries}): a request at the limit could never be admitted")


@dataclasses.dataclass
class BatchingConfig:
    """Micro-batching. enabled=False embeds each request on its own (the one-request-per-call baseline), still
    in slices of at most max_batch_queries."""

    enabled: bool = True
    max_batch_queries: int = 256
    max_wait_ms: float = 5.0


class RequestError(Exception):
    """A client error: answered with `status` and {"detail": message}."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


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


def parse_retrieve_request(body: bytes, limits: ServerLimits) -> tuple[list[str], int, bool]:
    """Validate a /retrieve body -> (queries [Q], topk, return_scores), or raise RequestError naming the problem."""
    try:
        payload = json.loads(body)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise RequestError(400, f"request body is not valid JSON: {e}") from None
    except RecursionError:
        raise RequestError(400, "request body is JSON nested too deeply") from None
    except ValueError as e:  # e.g. an integer of more than 4300 digits
        raise RequestError(400, f"request body holds a value Python refuses to read: {str(e)[:200]}") from None
    if not isinstance(payload, dict):
        raise RequestError(422, 'request body must be a JSON object {"queries": [...], "topk": k, '
                                f'"return_scores": bool}}, got a JSON {type(payload).__name__}')
    if "queries" not in payload:
        raise RequestError(422, "'queries' is required: a list of strings")
    queries = payload["queries"]
    if not isinstance(queries, list):
        raise RequestError(422, f"'queries' must be a list of strings, got {type(queries).__name__}")
    if len(queries) > limits.max_queries:
        raise RequestError(422, f"too many queries: {len(queries)} in one request, the limit is "
                                f"{limits.max_queries}; split the request")
    total = 0
    for i, q in enumerate(queries):
        if not isinstance(q, str):
            raise RequestError(422, f"'queries[{i}]' must be a string, got {type(q).__name__}")
        if len(q) > limits.max_query_chars:
            raise RequestError(422, f"'queries[{i}]' has {len(q)} characters, the limit is {limits.max_query_chars}")
        total += len(q)
        try:
            q.encode("utf-8")
        except UnicodeEncodeError as e:
            raise RequestError(422, f"'queries[{i}]' is not valid Unicode text: {e.reason} at character "
                                    f"{e.start} ({q[e.start]!r}); send UTF-8 text") from None
    if total > limits.max_request_chars:
        raise RequestError(422, f"the queries hold {total} characters in all, the limit per request is "
                                f"{limits.max_request_chars}; split the request")
    topk = payload.get("topk")
    if topk is None or (type(topk) is int and topk == 0):  # Search-R1: absent, null or 0 -> the default
        topk = limits.default_topk
    elif isinstance(topk, bool) or not isinstance(topk, int):
        raise RequestError(422, f"'topk' must be an integer, got {type(topk).__name__} {topk!r:.40}")
    elif topk < 0:
        raise RequestError(422, f"'topk' must be >= 0 (0 or null: the default {limits.default_topk}), got {topk}")
    elif topk > limits.max_topk:
        raise RequestError(422, f"'topk' {topk} exceeds the limit {limits.max_topk}")
    return_scores = payload.get("return_scores", False)
    if return_scores is None:
        return_scores = False
    if not isinstance(return_scores, bool):
        raise RequestError(422, f"'return_scores' must be true or false, got {return_scores!r:.40}")
    return queries, topk, return_scores


def create_app(retriever: LocalRetriever, limits: ServerLimits | None = None,
               batching: BatchingConfig | None = None) -> FastAPI:
    """The FastAPI application serving `retriever` (run it with ServerThread or serve(), which add the
    connection limits of `limits`)."""
    limits = limits or ServerLimits()
    batcher = MicroBatcher(retriever, batching or BatchingConfig())

    @contextlib.asynccontextmanager
    async def lifespan(_app: FastAPI) -> AsyncIterator[None]:
        batcher.start()
        yield
        await batcher.stop()

    app = FastAPI(title="rexrag-fast retrieval", lifespan=lifespan)
    app.state.batcher = batcher
    app.state.limits = limits

    @app.exception_handler(RequestError)
    async def _request_error(_request: Request, exc: RequestError) -> JSONResponse:
        return JSONResponse({"detail": exc.message}, status_code=exc.status)

    @app.post("/retrieve")
    async def retrieve(request: Request) -> JSONResponse:
        body = await _read_body(request, limits)
        queries, topk, return_scores = parse_retrieve_request(body, limits)
        del body
        if not queries:
            return JSONResponse({"result": []})
        if batcher.pending_requests >= limits.max_pending_requests or \
                batcher.pending_queries + len(queries) > limits.max_pending_queries:
            return JSONResponse({"detail": f"server busy: {batcher.pending_requests} requests holding "
                                           f"{batcher.pending_queries} queries in flight (limits "
                                           f"{limits.max_pending_requests} requests, {limits.max_pending_queries} "
                                           f"queries); retry after {limits.retry_after_s} s"},
                                status_code=503, headers={"Retry-After": str(limits.retry_after_s)})
        try:
            result = await batcher.submit(queries, topk, return_scores)
        except Exception as e:
            return JSONResponse({"detail": f"retrieval failed: {type(e).__name__}: {e}"}, status_code=500)
        return JSONResponse({"result": result})

    @app.get("/health")
    async def health() -> dict[str, Any]:
        m = retriever.index.manifest
        return {"status": "ok", "documents": len(retriever), "embedder": m["embedder"],
                "dimension": m["dimension"], "index_type": m["index_type"],
                "pending_requests": batcher.pending_requests, "pending_queries": batcher.pending_queries,
                "batches": batcher.batches, "queries": batcher.queries,
                "batching": dataclasses.asdict(batcher.config), "limits": dataclasses.asdict(limits)}

    return app


async def _read_body(request: Request, limits: ServerLimits) -> bytes:
    """The request body, refusing (413) more than max_body_bytes without reading past the limit, and (408) a
    body that takes longer than body_timeout_s to arrive."""
    limit = limits.max_body_bytes
    declared = request.headers.get("content-length")
    if declared is not None:
        try:
            size = int(declared)
        except ValueError:
            raise RequestError(400, f"bad Content-Length header {declared!r:.40}") from None
        if size > limit:
            raise RequestError(413, f"request body of {size} bytes exceeds the limit of {limit} bytes; "
                                    "send fewer or shorter queries per request")
    chunks: list[bytes] = []
    received = 0

    async def read() -> None:
        nonlocal received
        async for chunk in request.stream():
            received += len(chunk)
            if received > limit:
                raise RequestError(413, f"request body exceeds the limit of {limit} bytes; "
                                        "send fewer or shorter queries per request")
            chunks.append(chunk)

    try:
        await asyncio.wait_for(read(), limits.body_timeout_s)
    except asyncio.TimeoutError:  # not the builtin TimeoutError before Python 3.11
        raise RequestError(408, f"request body not received within {limits.body_timeout_s} s "
                                f"({received} bytes arrived)") from None
    return b"".join(chunks)


def guarded_http_protocol(limits: ServerLimits) -> type[asyncio.Protocol]:
    """uvicorn's h11 protocol with a connection cap and a request-head timeout from `limits`.

    Past max_connections open connections, a new one is answered 503 (Retry-After) and closed. A connection
    that has not sent a complete request head header_timeout_s after it opened, or after its last response,
    is closed: uvicorn's keep-alive timer stops at the first byte, so without this an idle or slowloris client
    holds its connection forever.
    """
    from uvicorn.protocols.http.h11_impl import H11Protocol

    busy = (f"HTTP/1.1 503 Service Unavailable\r\nRetry-After: {limits.retry_after_s}\r\nConnection: close\r\n"
            "Content-Type: application/json\r\n").encode()
    busy_body = json.dumps({"detail": f"server busy: {limits.max_connections} connections open, the limit; "
                                      f"retry after {limits.retry_after_s} s"}).encode()
    busy += f"Content-Length: {len(busy_body)}\r\n\r\n".encode() + busy_body

    class GuardedH11Protocol(H11Protocol):
        _head_timer: asyncio.TimerHandle | None = None

        def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
            super().connection_made(transport)
            if len(self.connections) > limits.max_connections:
                transport.write(busy)
                transport.close()
                return
            self._arm_head_timer()

        def connection_lost(self, exc: Exception | None) -> None:
            self._disarm_head_timer()
            super().connection_lost(exc)

        def data_received(self, data: bytes) -> None:
            super().data_received(data)
            if self.conn.their_state is not h11.IDLE:  # the request head is complete
                self._disarm_head_timer()

        def on_response_complete(self) -> None:
            super().on_response_complete()
            if not self.transport.is_closing() and self.conn.their_state is h11.IDLE:
                self._arm_head_timer()

        def _arm_head_timer(self) -> None:
            self._disarm_head_timer()
            self._head_timer = self.loop.call_later(limits.header_timeout_s, self._head_timed_out)

        def _disarm_head_timer(self) -> None:
            if self._head_timer is not None:
                self._head_timer.cancel()
                self._head_timer = None

        def _head_timed_out(self) -> None:
            self._head_timer = None
            if not self.transport.is_closing() and self.conn.their_state is h11.IDLE:
                self.transport.close()

    return GuardedH11Protocol


def uvicorn_config(app: Any, host: str, port: int, log_level: str = "warning") -> Any:
    """uvicorn.Config for `app` (from create_app): h11 with the connection limits of app.state.limits."""
    import uvicorn

    limits = getattr(app.state, "limits", None) or ServerLimits()
    return uvicorn.Config(app, host=host, port=port, log_level=log_level, http=guarded_http_protocol(limits),
                          timeout_graceful_shutdown=5, backlog=4096)


class ServerThread:
    """Runs an app under uvicorn on a background thread, on a socket bound before start (port 0 = a free port).

        with ServerThread(create_app(retriever)) as srv:
            RetrievalClient(srv.url + "/retrieve") ...
    """

    def __init__(self, app: Any, host: str = "127.0.0.1", port: int = 0, startup_timeout: float = 30.0) -> None:
        import uvicorn

        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind((host, port))
        self.host, self.port = self.sock.getsockname()[:2]
        self.server = uvicorn.Server(uvicorn_config(app, self.host, self.port))
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.sock]},
                                       name=f"uvicorn-{self.port}", daemon=True)
        self.startup_timeout = startup_timeout

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def start(self) -> ServerThread:
        self.thread.start()
        deadline = time.monotonic() + self.startup_timeout
        while not self.server.started:
            if not self.thread.is_alive():
                raise RuntimeError(f"retrieval server on {self.url} exited during start-up")
            if time.monotonic() > deadline:
                self.stop()
                raise TimeoutError(f"retrieval server on {self.url} did not start in {self.startup_timeout}s")
            time.sleep(0.01)
        return self

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=15)
        self.sock.close()

    def __enter__(self) -> ServerThread:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def serve(index_dir: str, host: str = "127.0.0.1", port: int = 8000, limits: ServerLimits | None = None,
          batching: BatchingConfig | None = None, embedder: str | None = None, corpus_path: str | None = None,
          device: str | None = None, dtype: str = "auto") -> None:
    """Load `index_dir` and serve it on host:port until interrupted (blocking)."""
    import uvicorn

    retriever = LocalRetriever.from_index(index_dir, embedder=embedder, corpus_path=corpus_path, device=device,
                                          dtype=dtype)
    app = create_app(retriever, limits, batching)
    uvicorn.Server(uvicorn_config(app, host, port, log_level="info")).run()
