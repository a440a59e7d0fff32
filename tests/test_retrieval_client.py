"""RetrievalClient against real HTTP servers on loopback: same answers as LocalRetriever, request splitting,
retries with backoff on 5xx, no retry on 4xx, timeouts, and a clear error when nothing listens."""

from __future__ import annotations

import asyncio
import json
import socket

import pytest
from fastapi import FastAPI
from fastapi.responses import JSONResponse

from rexrag_fast.data.world import generate_world
from rexrag_fast.retrieval import (
    LocalRetriever,
    RetrievalClient,
    RetrievalRequestError,
    RetrievalUnavailableError,
    build_index,
    format_passages,
)
from rexrag_fast.retrieval.server import ServerLimits, ServerThread, create_app


@pytest.fixture(scope="module")
def retriever(tmp_path_factory) -> LocalRetriever:
    root = tmp_path_factory.mktemp("client")
    with open(root / "corpus.jsonl", "w") as f:
        for d in generate_world(seed=0).documents[::100]:
            f.write(json.dumps(d) + "\n")
    build_index(root / "corpus.jsonl", root / "index", chunk_size=64, progress=False)
    return LocalRetriever.from_index(root / "index")


def test_client_returns_what_local_retriever_returns(retriever):
    queries = [f"question {i} about a company founder" for i in range(5)]
    with ServerThread(create_app(retriever, ServerLimits(max_queries=2))) as srv, \
            RetrievalClient(srv.url + "/retrieve", batch_size=2) as client:
        # 5 queries against a 2-queries-per-request server: the client splits them into 3 requests
        remote = client.retrieve(queries, topk=3)
        local = retriever.retrieve(queries, topk=3)
        assert [[h["document"] for h in r] for r in remote] == [[h["document"] for h in r] for r in local]
        assert [format_passages(r) for r in remote] == [format_passages(r) for r in local]
        plain = client.retrieve(queries[:1], topk=2, return_scores=False)
        assert plain == [[h["document"] for h in local[0][:2]]]
        assert client.health()["documents"] == len(retriever)
        with pytest.raises(RetrievalRequestError, match=r"\(422\).*'topk' 500 exceeds the limit 100") as info:
            client.retrieve(queries[:1], topk=500)
        assert info.value.status == 422


def _flaky_app(fail_first: int, status: int, delay_s: float = 0.0) -> tuple[FastAPI, list[int]]:
    """A real HTTP server that answers `status` to the first `fail_first` requests, then a valid result."""
    app = FastAPI()
    seen: list[int] = []

    @app.post("/retrieve")
    async def retrieve(body: dict) -> JSONResponse:
        seen.append(1)
        if delay_s:
            await asyncio.sleep(delay_s)
        if len(seen) <= fail_first:
            return JSONResponse({"detail": f"failure number {len(seen)}"}, status_code=status)
        return JSONResponse({"result": [[{"document": {"id": "1", "contents": '"T"\nx'}, "score": 1.0}]
                                        for _ in body["queries"]]})

    return app, seen


@pytest.mark.parametrize("status", [500, 503, 429])
def test_retries_with_backoff_then_succeeds(status):
    app, seen = _flaky_app(fail_first=2, status=status)
    with ServerThread(app) as srv, RetrievalClient(srv.url + "/retrieve", retries=3, backoff=0.01) as client:
        assert client.retrieve(["q"], topk=1)[0][0]["document"]["id"] == "1"
    assert len(seen) == 3


def test_gives_up_after_retries_on_persistent_5xx():
    app, seen = _flaky_app(fail_first=100, status=502)
    with (ServerThread(app) as srv, RetrievalClient(srv.url + "/retrieve", retries=2, backoff=0.01) as client,
          pytest.raises(RetrievalUnavailableError, match=r"after 3 attempts.*HTTP 502: failure number 3")):
        client.retrieve(["q"])
    assert len(seen) == 3


def test_4xx_is_not_retried():
    app, seen = _flaky_app(fail_first=100, status=422)
    with (ServerThread(app) as srv, RetrievalClient(srv.url + "/retrieve", retries=3, backoff=0.01) as client,
          pytest.raises(RetrievalRequestError, match="failure number 1")):
        client.retrieve(["q"])
    assert len(seen) == 1


def test_timeout_is_retried_then_reported():
    app, seen = _flaky_app(fail_first=0, status=200, delay_s=1.0)
    with (ServerThread(app) as srv,
          RetrievalClient(srv.url + "/retrieve", timeout=0.1, retries=1, backoff=0.01) as client,
          pytest.raises(RetrievalUnavailableError, match="timed out after 0.1s")):
        client.retrieve(["q"])
    assert len(seen) == 2


def test_clear_error_when_nothing_listens():
    with socket.socket() as s:  # a port that was free a moment ago and has no listener now
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    url = f"http://127.0.0.1:{port}/retrieve"
    with RetrievalClient(url, timeout=1.0, retries=2, backoff=0.01) as client, \
            pytest.raises(RetrievalUnavailableError) as info:
        client.retrieve(["q"])
    message = str(info.value)
    assert url in message and "after 3 attempts" in message and "ConnectError" in message
    assert f"rexrag-fast serve --index DIR --port {port}" in message


@pytest.mark.parametrize("kwargs, message", [
    ({"url": "127.0.0.1:8000/retrieve"}, "http"),
    ({"timeout": 0}, "timeout"),
    ({"retries": -1}, "retries"),
    ({"batch_size": 0}, "batch_size"),
])
def test_bad_client_arguments(kwargs, message):
    with pytest.raises(ValueError, match=message):
        RetrievalClient(**kwargs)


def test_bad_call_arguments_fail_before_any_request():
    client = RetrievalClient("http://127.0.0.1:9/retrieve", retries=0)
    with pytest.raises(TypeError, match="list of str"):
        client.retrieve("not a list")
    with pytest.raises(ValueError, match="topk"):
        client.retrieve(["q"], topk=0)
    assert client.url.endswith("/retrieve") and client.health_url.endswith("/health")
    assert RetrievalClient("http://127.0.0.1:9").url == "http://127.0.0.1:9/retrieve"
