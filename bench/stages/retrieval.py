"""Stage `retrieval`: index build docs/s, and queries/s of the real HTTP server with micro-batching against the same
server embedding one request (one query) per call, on the embedded world.

Load: C concurrent clients on loopback (keep-alive HTTP/1.1 over asyncio streams in a separate process, so the
load generator does not compete with the server for this process's GIL), each sending one-query requests back to
back for a fixed time; queries/s = answered queries / elapsed. A fixed duration, not a fixed count, keeps the
stage bounded on a slow or shared CPU.
"""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import tempfile
import time
import urllib.parse
from pathlib import Path

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse

from bench.harness import Progress, Row, stage

REPO_ROOT = Path(__file__).resolve().parents[2]

PRESET_SIZES = {
    # docs indexed (None: the whole default world), concurrent clients, seconds of load per mode,
    # queries of the in-process comparison
    "tiny": {"docs": 96, "clients": 128, "seconds": 3.0, "in_process_batch": 32},
    "qwen2.5-3b": {"docs": None, "clients": 128, "seconds": 20.0, "in_process_batch": 512},
}


def _load(url: str, queries: list[str], clients: int, seconds: float) -> tuple[int, float]:
    """Run `clients` loops of one-query POSTs for `seconds`; returns (answered queries, elapsed seconds).

    Each client holds one keep-alive HTTP/1.1 connection and writes requests by hand over asyncio streams, as
    wrk does: a general-purpose client (httpx) costs more CPU per request than the server's handler, and on
    2 cores it capped the load at ~95 requests/s, measuring the load generator rather than the server.
    """
    parsed = urllib.parse.urlsplit(url)
    host, port, path = parsed.hostname or "127.0.0.1", parsed.port or 80, parsed.path or "/"

    def encode(query: str) -> bytes:
        body = json.dumps({"queries": [query], "topk": 3, "return_scores": True}).encode()
        head = (f"POST {path} HTTP/1.1\r\nHost: {host}:{port}\r\nContent-Type: application/json\r\n"
                f"Content-Length: {len(body)}\r\n\r\n")
        return head.encode() + body

    requests = [encode(q) for q in queries]

    async def read_response(reader: asyncio.StreamReader) -> None:
        status = await reader.readline()
        if not status.startswith(b"HTTP/1.1 200"):
            raise RuntimeError(f"server answered {status!r:.80} instead of 200")
        length = None
        while (line := await reader.readline()) not in (b"\r\n", b""):
            name, _, value = line.partition(b":")
            if name.strip().lower() == b"content-length":
                length = int(value)
        if length is None:
            raise RuntimeError("response without Content-Length")
        await reader.readexactly(length)

    async def main() -> tuple[int, float]:
        answered = 0
        start = time.perf_counter()
        deadline = start + seconds

        async def worker(w: int) -> None:
            nonlocal answered
            reader, writer = await asyncio.open_connection(host, port)
            i = w
            try:
                while time.perf_counter() < deadline:
                    writer.write(requests[i % len(requests)])
                    await writer.drain()
                    await read_response(reader)
                    answered += 1
                    i += clients
            finally:
                writer.close()

        await asyncio.gather(*(worker(w) for w in range(clients)))
        return answered, time.perf_counter() - start

    return asyncio.run(main())


def _load_in_subprocess(url: str, queries_file: Path, clients: int, seconds: float) -> tuple[int, float]:
    cmd = [sys.executable, "-m", "bench.stages.retrieval", "--url", url, "--queries", str(queries_file),
           "--clients", str(clients), "--seconds", str(seconds)]
    done = subprocess.run(cmd, cwd=REPO_ROOT, capture_output=True, text=True, timeout=seconds + 300)
    if done.returncode != 0:
        raise RuntimeError(f"load generator failed ({done.returncode}): {done.stderr[-2000:]}")
    answered, elapsed = json.loads(done.stdout.strip().splitlines()[-1])
    return int(answered), float(elapsed)


def _noop_app() -> FastAPI:
    app = FastAPI()
    answer = {"result": [[{"document": {"id": "0", "contents": '"T"\n' + "x" * 150}, "score": 1.0}] * 3]}

    @app.post("/retrieve")
    async def retrieve(request: Request) -> JSONResponse:
        await request.body()
        return JSONResponse(answer)

    return app


@stage("retrieval")
def retrieval(preset: str, progress: Progress) -> list[Row]:
    from rexrag_fast.data.world import World, default_world_dir
    from rexrag_fast.retrieval import LocalRetriever, build_index, get_embedder
    from rexrag_fast.retrieval.batcher import BatchingConfig
    from rexrag_fast.retrieval.server import ServerThread, create_app

    sizes = PRESET_SIZES[preset]
    progress("loading the embedded world and the embedder")
    world = World.load(default_world_dir())
    docs = world.documents if sizes["docs"] is None else world.documents[:: max(1, len(world.documents) //
                                                                                 sizes["docs"])][: sizes["docs"]]
    queries = [q["question"] for q in world.questions]
    embedder = get_embedder()
    embedder.embed_passages([d["contents"] for d in docs[:8]])  # warm-up outside the timed build
    rows: list[Row] = []
    device = embedder.device
    with tempfile.TemporaryDirectory(prefix="rexrag-bench-retrieval-") as tmp:
        corpus = Path(tmp) / "corpus.jsonl"
        corpus.write_text("".join(json.dumps(d) + "\n" for d in docs))
        progress(f"building a flat index over {len(docs)} documents")
        t0 = time.perf_counter()
        build_index(corpus, Path(tmp) / "index", embedder=embedder, chunk_size=128, progress=False)
        build_s = time.perf_counter() - t0
        rows.append(Row("retrieval", "index build (flat)", len(docs) / build_s, "docs/s",
                        config=f"{len(docs)} world docs, {embedder.name}, {device} {embedder.dtype}, chunk 128"))
        retriever = LocalRetriever.from_index(Path(tmp) / "index", embedder=embedder)
        # The embedding call alone, without HTTP: one call for a batch against one call per query.
        batch = queries[: sizes["in_process_batch"]]
        retriever.retrieve(batch[:2], topk=3)
        t0 = time.perf_counter()
        retriever.retrieve(batch, topk=3)
        batched_s = time.perf_counter() - t0
        t0 = time.perf_counter()
        for q in batch:
            retriever.retrieve([q], topk=3)
        single_s = time.perf_counter() - t0
        rows.append(Row("retrieval", "LocalRetriever queries/s, one call", len(batch) / batched_s, "queries/s",
                        baseline_value=len(batch) / single_s, baseline="one call per query",
                        config=f"{len(batch)} queries, {len(docs)} docs, topk 3, {device}, in-process"))

        queries_file = Path(tmp) / "queries.json"
        queries_file.write_text(json.dumps(queries))

        qps: dict[bool, float] = {}
        stats: dict[bool, dict[str, float]] = {}
        for batching in (True, False):
            config = BatchingConfig(enabled=batching, max_batch_queries=256, max_wait_ms=5.0)
            with ServerThread(create_app(retriever, batching=config)) as srv:
                url = srv.url + "/retrieve"
                _load_in_subprocess(url, queries_file, 4, 0.5)  # warm-up: connections, first forward of each shape
                batcher = srv.server.config.app.state.batcher
                b0, q0 = batcher.batches, batcher.queries
                progress(f"server load, batching={'on' if batching else 'off'}: {sizes['clients']} clients "
                         f"for {sizes['seconds']:.0f} s")
                answered, elapsed = _load_in_subprocess(url, queries_file, sizes["clients"], sizes["seconds"])
                qps[batching] = answered / elapsed
                n_batches = batcher.batches - b0
                stats[batching] = {"answered": answered, "seconds": round(elapsed, 2), "embedding_calls": n_batches,
                                   "mean_queries_per_call": round((batcher.queries - q0) / max(n_batches, 1), 1)}
        # Context for the row below: what the HTTP stack alone sustains here (same load, an endpoint doing nothing).
        with ServerThread(_noop_app()) as srv:
            answered, elapsed = _load_in_subprocess(srv.url + "/retrieve", queries_file, sizes["clients"],
                                                    sizes["seconds"])
        ceiling = answered / elapsed
        rows.append(Row("retrieval", "HTTP ceiling: no-op /retrieve", ceiling, "requests/s",
                        config=f"{sizes['clients']} clients, same load generator, no embedding or search"))
        rows.append(Row("retrieval", "server queries/s, micro-batched", qps[True], "queries/s",
                        baseline_value=qps[False], baseline="one query per embedding call",
                        config=f"{sizes['clients']} clients x 1-query requests, {len(docs)} docs, topk 3, "
                               f"{device} {embedder.dtype}",
                        extra={"batched": stats[True], "unbatched": stats[False]}))
    return rows


if __name__ == "__main__":
    # The load generator process: python -m bench.stages.retrieval --url U --queries F --clients C --seconds S
    import argparse

    parser = argparse.ArgumentParser()
    parser.add_argument("--url", required=True)
    parser.add_argument("--queries", type=Path, required=True)
    parser.add_argument("--clients", type=int, required=True)
    parser.add_argument("--seconds", type=float, required=True)
    args = parser.parse_args()
    print(json.dumps(_load(args.url, json.loads(args.queries.read_text()), args.clients, args.seconds)))
