"""Search-R1-compatible retrieval server (FastAPI + uvicorn) with fair micro-batching of concurrent requests.

    POST /retrieve {"queries": [str, ...], "topk": k, "return_scores": bool}
      -> {"result": [[{"document": {"id", "contents"}, "score": float}, ...], ...]}   (return_scores true)
      -> {"result": [[{"id", "contents"}, ...], ...]}                               (return_scores false)
    GET /health -> {"status": "ok", "documents": N, "embedder": ..., ...}

As in Search-R1's server: topk absent, null or 0 means the server's default (3), return_scores defaults to false,
and {"queries": []} is answered 200 {"result": []} (trainers post every turn, also when no rollout searched).

Batching: concurrent requests share embedding calls in fair slices (`batcher.MicroBatcher`).

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
import contextlib
import dataclasses
import json
import socket
import threading
import time
from collections.abc import AsyncIterator
from typing import Any

import h11
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse

from rexrag_fast.retrieval.batcher import BatchingConfig, MicroBatcher
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


class RequestError(Exception):
    """A client error: answered with `status` and {"detail": message}."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


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
