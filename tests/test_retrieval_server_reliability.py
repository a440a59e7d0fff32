"""Reliability of the retrieval server, each against a real server on a loopback port: one bad query fails only
its own request, big requests are sliced fairly, overload answers 503, idle/slowloris connections are closed,
connections are capped, results do not depend on the batch, and Search-R1's empty turn is answered.

Batches are made deterministic without timing: a request holding the query HOLD blocks the batch worker inside
the real retriever until the test releases it, so everything sent meanwhile waits and forms the next batch.
"""

from __future__ import annotations

import json
import socket
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import contextmanager

import httpx
import numpy as np
import pytest
from test_retrieval_server import QUERIES, _ids, retriever  # noqa: F401  (retriever: the shared index fixture)

from rexrag_fast.data.world import generate_world
from rexrag_fast.retrieval import LocalRetriever
from rexrag_fast.retrieval.batcher import BatchingConfig, fair_shares
from rexrag_fast.retrieval.server import (
    ServerLimits,
    ServerThread,
    create_app,
    parse_retrieve_request,
)

HOLD = "__hold the batch worker__"
POISON = "__poison__"
BOUND_S = 120.0  # "did not hang" bound of every wait below; nothing is timed


def _wait_until(condition: Callable[[], bool], what: str) -> None:
    deadline = time.monotonic() + BOUND_S
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"still waiting after {BOUND_S} s for {what}")
        time.sleep(0.01)


class _GatedRetriever(LocalRetriever):
    """The real retriever, recording the queries of every call; a call holding HOLD waits for `release`, and a
    call holding POISON raises (the stand-in for any query that breaks the embedder)."""

    def __init__(self, inner: LocalRetriever) -> None:
        super().__init__(inner.index, inner.embedder)
        self.calls: list[list[str]] = []
        self.holding = threading.Event()
        self.release = threading.Event()

    def retrieve(self, queries, topk=3, return_scores=True):
        self.calls.append(list(queries))
        if HOLD in queries:
            self.holding.set()
            if not self.release.wait(BOUND_S):
                raise TimeoutError("the test never released the held batch")
        if POISON in queries:
            raise RuntimeError("poisoned batch")
        return super().retrieve(queries, topk, return_scores)


@contextmanager
def _held_server(retriever: LocalRetriever, limits: ServerLimits | None = None,  # noqa: F811
                 max_batch_queries: int = 256) -> Iterator[tuple[ServerThread, _GatedRetriever, Callable]]:
    """A server whose batch worker is held; yields (server, gated retriever, send) where send(payload) posts
    from a thread and returns a Future of the response once the request is queued behind the held batch."""
    gated = _GatedRetriever(retriever)
    app = create_app(gated, limits or ServerLimits(), BatchingConfig(max_batch_queries=max_batch_queries,
                                                                     max_wait_ms=5))
    with ServerThread(app) as srv, httpx.Client(base_url=srv.url, timeout=BOUND_S) as http, \
            ThreadPoolExecutor(16) as pool:
        batcher = app.state.batcher

        def send(payload: dict, queued: bool = True) -> Future:
            before = batcher.pending_requests
            # json.dumps escapes to ASCII, so a lone surrogate reaches the server as the six characters \ud800
            future = pool.submit(http.post, "/retrieve", content=json.dumps(payload).encode(),
                                 headers={"content-type": "application/json"})
            if queued:  # one at a time, so that arrival order is the order of the calls
                _wait_until(lambda: batcher.pending_requests > before or future.done(), "the request to queue")
            return future

        held = send({"queries": [HOLD]}, queued=False)
        _wait_until(gated.holding.is_set, "the batch worker to take the held request")
        try:
            yield srv, gated, send
        finally:
            gated.release.set()
        assert held.result(BOUND_S).status_code == 200


def test_a_query_that_breaks_retrieval_fails_only_its_own_request(retriever):  # noqa: F811
    with _held_server(retriever) as (_srv, gated, send):
        innocent = [send({"queries": [f"{q} {i}" for q in QUERIES], "topk": 2}) for i in range(4)]
        bad = send({"queries": ["fine", POISON]})
        innocent += [send({"queries": [f"Which river, number {i}?"]}) for i in range(4)]
        gated.release.set()
        assert bad.result(BOUND_S).status_code == 500 and "poisoned batch" in bad.result().json()["detail"]
        for f in innocent:
            assert f.result(BOUND_S).status_code == 200, f.result().text
    # The bad request was batched with the innocent ones, then each was retried on its own.
    merged = gated.calls[1]
    assert POISON in merged and len(merged) == 4 * 2 + 2 + 4


def test_lone_surrogate_is_refused_at_parsing_and_batched_neighbours_are_answered(retriever):  # noqa: F811
    with _held_server(retriever) as (_srv, gated, send):
        innocent = [send({"queries": [f"Who founded company {i}?"]}) for i in range(3)]
        bad = send({"queries": ["ok", "\ud800 lone surrogate"]})
        gated.release.set()
        assert bad.result(BOUND_S).status_code == 422
        assert "'queries[1]' is not valid Unicode text" in bad.result().json()["detail"]
        assert [f.result(BOUND_S).status_code for f in innocent] == [200] * 3


def test_a_large_request_is_sliced_and_a_small_one_is_answered_in_the_next_batch(retriever):  # noqa: F811
    big = [f"Where was person {i} born?" for i in range(40)]
    with _held_server(retriever, max_batch_queries=8) as (_srv, gated, send):
        big_answer = send({"queries": big, "topk": 2})
        small_answer = send({"queries": ["Which city lies on a river?"], "topk": 2})
        gated.release.set()
        big_result = big_answer.result(BOUND_S).json()["result"]
        small_result = small_answer.result(BOUND_S).json()["result"]
    after_hold = gated.calls[1:]
    assert all(len(call) <= 8 for call in after_hold), [len(c) for c in after_hold]
    assert "Which city lies on a river?" in after_hold[0]  # not behind the 40 queries
    assert sum(len(c) for c in after_hold) == 41
    assert _ids(big_result) == _ids(retriever.retrieve(big, topk=2))
    assert _ids(small_result) == _ids(retriever.retrieve(["Which city lies on a river?"], topk=2))


def test_past_max_pending_requests_a_request_gets_503_with_retry_after(retriever):  # noqa: F811
    limits = ServerLimits(max_pending_requests=3, max_pending_queries=4096, retry_after_s=2)
    with _held_server(retriever, limits) as (_srv, gated, send):
        admitted = [send({"queries": [f"question {i}"]}) for i in range(2)]  # + the held one = 3 in flight
        refused = send({"queries": ["one too many"]}, queued=False).result(BOUND_S)
        assert refused.status_code == 503 and refused.headers["retry-after"] == "2"
        assert "3 requests" in refused.json()["detail"]
        gated.release.set()
        assert [f.result(BOUND_S).status_code for f in admitted] == [200, 200]
    with _held_server(retriever, ServerLimits(max_queries=8, max_pending_queries=10)) as (_srv, gated, send):
        send({"queries": ["q"] * 8})  # 1 held + 8 = 9 queries in flight
        refused = send({"queries": ["q"] * 2}, queued=False).result(BOUND_S)
        assert refused.status_code == 503 and "9 queries" in refused.json()["detail"]


def test_default_limits_admit_a_search_r1_turn_and_refuse_more(retriever):  # noqa: F811
    turn = {"queries": ["who is the founder of the company that built the bridge " * 7] * 2560, "topk": 3}
    assert len(parse_retrieve_request(json.dumps(turn).encode(), ServerLimits())[0]) == 2560
    with ServerThread(create_app(retriever)) as srv, httpx.Client(base_url=srv.url, timeout=BOUND_S) as http:
        resp = http.post("/retrieve", json={"queries": ["x" * 4000] * 300})  # 1.2 M characters
        assert resp.status_code == 422 and "1200000 characters in all" in resp.json()["detail"]
        assert http.post("/retrieve", json={"queries": ["y" * 9000]}).status_code == 422


def test_search_r1_empty_turn_and_default_topk(retriever):  # noqa: F811
    with ServerThread(create_app(retriever)) as srv, httpx.Client(base_url=srv.url, timeout=BOUND_S) as http:
        empty = http.post("/retrieve", json={"queries": [], "topk": 3, "return_scores": True})
        assert empty.status_code == 200 and empty.json() == {"result": []}
        default = http.post("/retrieve", json={"queries": QUERIES}).json()["result"]
        for topk in (0, None):
            got = http.post("/retrieve", json={"queries": QUERIES, "topk": topk}).json()["result"]
            assert got == default and all(len(r) == 3 for r in got)


def _closed_by_server(sock: socket.socket) -> bytes:
    """Everything the server sends until it closes `sock`."""
    sock.settimeout(BOUND_S)
    data = b""
    while chunk := sock.recv(4096):
        data += chunk
    return data


def test_idle_and_slowloris_connections_are_closed(retriever):  # noqa: F811
    limits = ServerLimits(header_timeout_s=1.0, body_timeout_s=1.0)
    with ServerThread(create_app(retriever, limits)) as srv:
        idle = [socket.create_connection((srv.host, srv.port)) for _ in range(3)]
        slow = socket.create_connection((srv.host, srv.port))
        slow.sendall(b"POST /retrieve HTTP/1.1\r\nHost: x\r\n")  # a head that never ends
        body_stalls = socket.create_connection((srv.host, srv.port))
        body_stalls.sendall(b"POST /retrieve HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                            b'Content-Length: 100\r\n\r\n{"queries": ')
        for sock in [*idle, slow]:
            assert _closed_by_server(sock) == b""
            sock.close()
        # An answered keep-alive connection gets the same head timeout for its next request.
        served = socket.create_connection((srv.host, srv.port))
        body = json.dumps({"queries": ["still answered?"]}).encode()
        served.sendall(b"POST /retrieve HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                       b"Content-Length: %d\r\n\r\n" % len(body) + body)
        served.settimeout(BOUND_S)
        answer = b""
        while not answer.endswith(b"]]}"):
            answer += served.recv(4096)
        assert answer.startswith(b"HTTP/1.1 200")
        served.sendall(b"POST /retrieve HTTP/1.1\r\n")  # then the next head stalls
        assert _closed_by_server(served) == b""
        served.close()
        stalled_answer = _closed_by_server(body_stalls)
        body_stalls.close()
        assert stalled_answer.startswith(b"HTTP/1.1 408"), stalled_answer[:200]
        connections = srv.server.server_state.connections
        _wait_until(lambda: not connections, "the server to drop every closed connection")


def test_connections_past_the_cap_get_503_and_are_closed(retriever):  # noqa: F811
    with ServerThread(create_app(retriever, ServerLimits(max_connections=4, header_timeout_s=BOUND_S))) as srv:
        connections = srv.server.server_state.connections
        held = [socket.create_connection((srv.host, srv.port)) for _ in range(4)]
        _wait_until(lambda: len(connections) == 4, "4 open connections")
        extra = socket.create_connection((srv.host, srv.port))
        answer = _closed_by_server(extra)
        extra.close()
        assert answer.startswith(b"HTTP/1.1 503") and b"Retry-After: 1" in answer
        for sock in held:
            sock.close()
        _wait_until(lambda: not connections, "the held connections to close")
        with httpx.Client(base_url=srv.url, timeout=BOUND_S) as http:
            assert http.post("/retrieve", json={"queries": ["after"]}).status_code == 200


def _mixed_queries(n: int) -> list[str]:
    world = generate_world(seed=0)
    questions = [q["question"] for q in world.questions]
    return [questions[i % len(questions)] + " and more" * (i % 7) for i in range(n)]


def test_query_embeddings_do_not_depend_on_the_batch(retriever):  # noqa: F811
    embedder = retriever.embedder
    queries = _mixed_queries(40)
    together = embedder.embed_queries(queries)
    for i in (0, 5, 17, 39):
        assert np.array_equal(embedder.embed_queries([queries[i]])[0], together[i])
    assert np.array_equal(embedder.embed_queries(queries[::-1])[::-1], together)


def test_served_results_do_not_depend_on_other_traffic(retriever):  # noqa: F811
    target = {"queries": QUERIES + ["Who was born in the capital city?"], "topk": 5, "return_scores": True}
    with ServerThread(create_app(retriever)) as srv, httpx.Client(base_url=srv.url, timeout=BOUND_S) as http:
        alone = http.post("/retrieve", json=target).json()["result"]
    with _held_server(retriever) as (_srv, gated, send):
        filler = _mixed_queries(60)
        futures = [send({"queries": filler[i:i + 6], "topk": 2}) for i in range(0, 30, 6)]
        batched = send(target)
        futures += [send({"queries": filler[i:i + 6], "topk": 4}) for i in range(30, 60, 6)]
        gated.release.set()
        assert batched.result(BOUND_S).json()["result"] == alone  # ids, order and scores, bit for bit
        assert all(f.result(BOUND_S).status_code == 200 for f in futures)
    assert len(gated.calls[1]) == 63  # the target really shared its batch with the 60 filler queries


@pytest.mark.parametrize("waiting, budget, grants", [
    ([1, 40], 8, [1, 7]),
    ([40, 1, 3], 8, [4, 1, 3]),
    ([5, 5, 5], 4, [2, 1, 1]),
    ([2, 2], 100, [2, 2]),
])
def test_fair_shares_are_max_min_fair(waiting, budget, grants):
    assert fair_shares(waiting, budget) == grants


def test_serve_refuses_limits_that_cannot_work(capsys):
    from rexrag_fast.cli import main

    assert main(["serve", "--index", "unused", "--max-queries", "5000", "--max-pending-queries", "4096"]) == 2
    assert "max_pending_queries (4096) is below max_queries (5000)" in capsys.readouterr().err
