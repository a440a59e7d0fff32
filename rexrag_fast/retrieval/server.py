"""Search-R1-compatible retrieval server (FastAPI + uvicorn) with micro-batching of concurrent requests.

    POST /retrieve {"queries": [str, ...], "topk": k, "return_scores": bool}
      -> {"result": [[{"document": {"id", "contents"}, "score": float}, ...], ...]}   (return_scores true)
      -> {"result": [[{"id", "contents"}, ...], ...]}                               (return_scores false)
    GET /health -> {"status": "ok", "documents": N, "embedder": ..., ...}

topk defaults to 3 and return_scores to false, as in Search-R1's server. Requests arriving together are merged:
a single worker takes the first waiting request, keeps gathering for up to `max_wait_ms` or until
`max_batch_queries` queries are waiting, embeds all their queries in one call, searches once with the largest
topk, and hands each request its slice. While a batch computes, the next one accumulates, so under load batches
grow by themselves. Bad input gets a 4xx JSON answer {"detail": "..."} naming the problem; a failure inside a
batch fails only that batch's requests (500) and the worker carries on.
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
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse

from rexrag_fast.retrieval.local import LocalRetriever


@dataclasses.dataclass
class ServerLimits:
    """Per-request limits; a request over any of them gets a 4xx answer naming the limit.

    Defaults admit a Search-R1 rollout step sending every active query at once (e.g. 512 prompts x 5 samples)
    and model-written queries far longer than the embedder reads (it truncates to max_length tokens).
    """

    max_queries: int = 4096
    max_topk: int = 100
    max_query_chars: int = 16384
    max_body_bytes: int = 32 * 1024 * 1024
    default_topk: int = 3

    def __post_init__(self) -> None:
        for name, value in dataclasses.asdict(self).items():
            if value < 1:
                raise ValueError(f"ServerLimits.{name} must be >= 1, got {value}")
        if self.default_topk > self.max_topk:
            raise ValueError(f"ServerLimits.default_topk ({self.default_topk}) exceeds max_topk ({self.max_topk})")


@dataclasses.dataclass
class BatchingConfig:
    """Micro-batching. enabled=False embeds each request on its own (the one-request-per-call baseline)."""

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


class MicroBatcher:
    """Gathers concurrent retrieve calls into one embedding + search call on a worker thread."""

    def __init__(self, retriever: LocalRetriever, config: BatchingConfig) -> None:
        if config.max_batch_queries < 1 or config.max_wait_ms < 0:
            raise ValueError(f"bad BatchingConfig {config}: need max_batch_queries >= 1 and max_wait_ms >= 0")
        self.retriever = retriever
        self.config = config
        self.queue: asyncio.Queue[_Pending] = asyncio.Queue()
        self.executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="retrieval-batch")
        self.batches = 0
        self.queries = 0
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
        future: asyncio.Future[list[list[dict[str, Any]]]] = asyncio.get_running_loop().create_future()
        await self.queue.put(_Pending(queries, topk, return_scores, future))
        self._arrived.set()
        return await future

    async def _gather(self) -> list[_Pending]:
        batch = [await self.queue.get()]
        if not self.config.enabled:
            return batch
        n = len(batch[0].queries)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.config.max_wait_ms / 1000.0
        while n < self.config.max_batch_queries:
            if self.queue.empty():
                remaining = deadline - loop.time()
                if remaining <= 0:
                    break
                # Sleep until a request arrives or the deadline passes. Waiting on the event, not on
                # wait_for(queue.get()), means a timeout can never swallow a request; not polling leaves the
                # event loop's CPU to the HTTP handlers.
                self._arrived.clear()
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._arrived.wait(), remaining)
                continue
            item = self.queue.get_nowait()
            batch.append(item)
            n += len(item.queries)
        return batch

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            batch = await self._gather()
            batch = [p for p in batch if not p.future.done()]  # drop requests whose client went away
            if not batch:
                continue
            queries = [q for p in batch for q in p.queries]
            topk = max(p.topk for p in batch)
            try:
                results = await loop.run_in_executor(self.executor, self.retriever.retrieve, queries, topk, True)
            except Exception as e:  # fail this batch's requests, keep serving
                for p in batch:
                    if not p.future.done():
                        p.future.set_exception(e)
                continue
            self.batches += 1
            self.queries += len(queries)
            start = 0
            for p in batch:
                mine = results[start:start + len(p.queries)]
                start += len(p.queries)
                # Best-first order makes the first k of the largest topk this request's top k.
                mine = [r[: p.topk] if p.return_scores else [hit["document"] for hit in r[: p.topk]] for r in mine]
                if not p.future.done():
                    p.future.set_result(mine)


def parse_retrieve_request(body: bytes, limits: ServerLimits) -> tuple[list[str], int, bool]:
    """Validate a /retrieve body -> (queries, topk, return_scores), or raise RequestError naming the problem."""
    try:
        payload = json.loads(body)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise RequestError(400, f"request body is not valid JSON: {e}") from None
    except RecursionError:
        raise RequestError(400, "request body is JSON nested too deeply") from None
    if not isinstance(payload, dict):
        raise RequestError(422, 'request body must be a JSON object {"queries": [...], "topk": k, '
                                f'"return_scores": bool}}, got a JSON {type(payload).__name__}')
    if "queries" not in payload:
        raise RequestError(422, "'queries' is required: a non-empty list of strings")
    queries = payload["queries"]
    if not isinstance(queries, list):
        raise RequestError(422, f"'queries' must be a list of strings, got {type(queries).__name__}")
    if not queries:
        raise RequestError(422, "'queries' is empty: send at least one query")
    if len(queries) > limits.max_queries:
        raise RequestError(422, f"too many queries: {len(queries)} in one request, the limit is "
                                f"{limits.max_queries}; split the request")
    for i, q in enumerate(queries):
        if not isinstance(q, str):
            raise RequestError(422, f"'queries[{i}]' must be a string, got {type(q).__name__}")
        if len(q) > limits.max_query_chars:
            raise RequestError(422, f"'queries[{i}]' has {len(q)} characters, the limit is {limits.max_query_chars}")
    topk = payload.get("topk")
    if topk is None:
        topk = limits.default_topk
    elif isinstance(topk, bool) or not isinstance(topk, int):
        raise RequestError(422, f"'topk' must be an integer, got {type(topk).__name__} {topk!r:.40}")
    elif topk < 1:
        raise RequestError(422, f"'topk' must be >= 1, got {topk}")
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
    """The FastAPI application serving `retriever`."""
    limits = limits or ServerLimits()
    batcher = MicroBatcher(retriever, batching or BatchingConfig())

    @contextlib.asynccontextmanager
    async def lifespan(_app: FastAPI) -> AsyncIterator[None]:
        batcher.start()
        yield
        await batcher.stop()

    app = FastAPI(title="rexrag-fast retrieval", lifespan=lifespan)
    app.state.batcher = batcher

    @app.exception_handler(RequestError)
    async def _request_error(_request: Request, exc: RequestError) -> JSONResponse:
        return JSONResponse({"detail": exc.message}, status_code=exc.status)

    @app.post("/retrieve")
    async def retrieve(request: Request) -> JSONResponse:
        body = await _read_body(request, limits.max_body_bytes)
        queries, topk, return_scores = parse_retrieve_request(body, limits)
        try:
            result = await batcher.submit(queries, topk, return_scores)
        except Exception as e:
            return JSONResponse({"detail": f"retrieval failed: {type(e).__name__}: {e}"}, status_code=500)
        return JSONResponse({"result": result})

    @app.get("/health")
    async def health() -> dict[str, Any]:
        m = retriever.index.manifest
        return {"status": "ok", "documents": len(retriever), "embedder": m["embedder"],
                "dimension": m["dimension"], "index_type": m["index_type"], "queue_depth": batcher.queue.qsize(),
                "batches": batcher.batches, "queries": batcher.queries,
                "batching": dataclasses.asdict(batcher.config), "limits": dataclasses.asdict(limits)}

    return app


async def _read_body(request: Request, limit: int) -> bytes:
    """The request body, refusing (413) more than `limit` bytes without reading past the limit."""
    declared = request.headers.get("content-length")
    if declared is not None:
        try:
            size = int(declared)
        except ValueError:
            raise RequestError(400, f"bad Content-Length header {declared!r:.40}") from None
        if size > limit:
            raise RequestError(413, f"request body of {size} bytes exceeds the limit of {limit} bytes; "
                                    "send fewer or shorter queries per request")
    chunks, total = [], 0
    async for chunk in request.stream():
        total += len(chunk)
        if total > limit:
            raise RequestError(413, f"request body exceeds the limit of {limit} bytes; "
                                    "send fewer or shorter queries per request")
        chunks.append(chunk)
    return b"".join(chunks)


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
        config = uvicorn.Config(app, log_level="warning", timeout_graceful_shutdown=5, backlog=4096)
        self.server = uvicorn.Server(config)
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
    """Load `index_dir` and serve it until interrupted (blocking)."""
    import uvicorn

    retriever = LocalRetriever.from_index(index_dir, embedder=embedder, corpus_path=corpus_path, device=device,
                                          dtype=dtype)
    uvicorn.run(create_app(retriever, limits, batching), host=host, port=port, log_level="info", backlog=4096)
