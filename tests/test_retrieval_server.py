"""The retrieval server, started for real on a loopback port: Search-R1 shapes, limits and bad input (4xx, and the
server keeps answering), 200 concurrent requests, micro-batching, and failures inside a batch."""

from __future__ import annotations

import asyncio
import json
import re
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest

from rexrag_fast.data.world import generate_world
from rexrag_fast.retrieval import LocalRetriever, build_index
from rexrag_fast.retrieval.batcher import BatchingConfig, MicroBatcher
from rexrag_fast.retrieval.server import ServerLimits, ServerThread, create_app

LIMITS = ServerLimits(max_queries=8, max_topk=5, max_query_chars=200, max_body_bytes=8192, default_topk=3)


@pytest.fixture(scope="module")
def retriever(tmp_path_factory) -> LocalRetriever:
    world = generate_world(seed=0)
    docs = world.documents[::60]  # ~33 documents of every kind
    root = tmp_path_factory.mktemp("server")
    with open(root / "corpus.jsonl", "w") as f:
        for d in docs:
            f.write(json.dumps(d) + "\n")
    build_index(root / "corpus.jsonl", root / "index", chunk_size=64, progress=False)
    return LocalRetriever.from_index(root / "index")


@pytest.fixture(scope="module")
def server(retriever):
    with ServerThread(create_app(retriever, LIMITS, BatchingConfig(max_batch_queries=64, max_wait_ms=5))) as srv:
        yield srv


@pytest.fixture(scope="module")
def http(server):
    with httpx.Client(base_url=server.url, timeout=60) as client:
        yield client


QUERIES = ["Who founded a shipbuilding company?", "Which city lies on a river?"]


def _ids(results):
    return [[r.get("document", r)["id"] for r in res] for res in results]


def test_response_shapes_match_search_r1(http, retriever):
    local = retriever.retrieve(QUERIES, topk=2, return_scores=True)
    resp = http.post("/retrieve", json={"queries": QUERIES, "topk": 2, "return_scores": True})
    assert resp.status_code == 200
    body = resp.json()
    assert list(body) == ["result"] and len(body["result"]) == 2
    for res, loc in zip(body["result"], local):
        assert len(res) == 2
        for hit, want in zip(res, loc):
            assert set(hit) == {"document", "score"} and set(hit["document"]) == {"id", "contents"}
            assert hit["document"] == want["document"]
            assert hit["score"] == pytest.approx(want["score"], abs=1e-5)
    # Search-R1 defaults: topk 3, return_scores false -> bare documents
    plain = http.post("/retrieve", json={"queries": QUERIES}).json()["result"]
    assert all(len(res) == 3 and all(set(d) == {"id", "contents"} for d in res) for res in plain)
    assert _ids(plain) == _ids(retriever.retrieve(QUERIES, topk=3))
    nulls = http.post("/retrieve", json={"queries": QUERIES, "topk": None, "return_scores": None}).json()
    assert nulls["result"] == plain


def test_health(http, retriever):
    health = http.get("/health").json()
    assert health["status"] == "ok" and health["documents"] == len(retriever)
    assert health["embedder"] == "all-MiniLM-L6-v2" and health["dimension"] == 384
    assert health["limits"]["max_topk"] == LIMITS.max_topk


BAD_BODIES = [
    (b"{not json", 400, "not valid JSON"),
    (b"", 400, "not valid JSON"),
    (b'["a"]', 422, "must be a JSON object"),
    (b"[" * 4000, 400, "nested too deeply"),
    (b'{"queries": ["\xff\xfe"]}', 400, "not valid JSON"),
    (b'{"topk": 3}', 422, "'queries' is required"),
    (b'{"queries": "one string"}', 422, "'queries' must be a list"),
    (b'{"queries": ["ok", 5]}', 422, r"'queries\[1\]' must be a string"),
    (b'{"queries": ["ok", null]}', 422, r"'queries\[1\]' must be a string"),
    (json.dumps({"queries": ["q"] * 9}).encode(), 422, "too many queries: 9 .* limit is 8"),
    (json.dumps({"queries": ["x" * 201]}).encode(), 422, r"'queries\[0\]' has 201 characters, the limit is 200"),
    (b'{"queries": ["q"], "topk": 1000000}', 422, "'topk' 1000000 exceeds the limit 5"),
    (b'{"queries": ["q"], "topk": -1}', 422, "'topk' must be >= 0"),
    (b'{"queries": ["q"], "topk": ' + b"9" * 5000 + b"}", 400, "value Python refuses to read"),
    (b'{"queries": ["ok", "\\ud800"]}', 422, r"'queries\[1\]' is not valid Unicode text"),
    (b'{"queries": ["q"], "topk": "3"}', 422, "'topk' must be an integer"),
    (b'{"queries": ["q"], "topk": true}', 422, "'topk' must be an integer"),
    (b'{"queries": ["q"], "topk": 2.5}', 422, "'topk' must be an integer"),
    (b'{"queries": ["q"], "return_scores": "yes"}', 422, "'return_scores' must be true or false"),
    (json.dumps({"queries": ["q"], "pad": "x" * 9000}).encode(), 413, "exceeds the limit of 8192 bytes"),
]


@pytest.mark.parametrize("body, status, message", BAD_BODIES, ids=[m for _, _, m in BAD_BODIES])
def test_bad_requests_get_4xx_naming_the_problem_and_the_server_survives(http, body, status, message):
    resp = http.post("/retrieve", content=body, headers={"content-type": "application/json"})
    assert resp.status_code == status, resp.text
    assert re.search(message, resp.json()["detail"]), resp.json()
    ok = http.post("/retrieve", json={"queries": ["still there?"], "topk": 1})
    assert ok.status_code == 200 and len(ok.json()["result"][0]) == 1


def test_oversized_chunked_body_without_content_length(http):
    def body():
        yield b'{"queries": ["'
        for _ in range(20):
            yield b"y" * 1000
        yield b'"]}'

    resp = http.post("/retrieve", content=body(), headers={"content-type": "application/json"})
    assert resp.status_code == 413 and "8192 bytes" in resp.json()["detail"]
    assert http.post("/retrieve", json={"queries": ["after"]}).status_code == 200


def test_200_concurrent_requests_all_answered_correctly(server, retriever):
    requests = [{"queries": [f"Who was born in city number {i}?"] + ([f"company {i}"] if i % 3 == 0 else []),
                 "topk": 1 + i % 5, "return_scores": i % 2 == 0} for i in range(200)]
    all_queries = sorted({q for r in requests for q in r["queries"]})
    expected = dict(zip(all_queries, _ids(retriever.retrieve(all_queries, topk=5))))
    before = httpx.get(server.url + "/health").json()

    with httpx.Client(base_url=server.url, timeout=120,
                      limits=httpx.Limits(max_connections=32, max_keepalive_connections=32)) as client, \
            ThreadPoolExecutor(32) as pool:
        responses = list(pool.map(lambda r: client.post("/retrieve", json=r), requests))

    assert [r.status_code for r in responses] == [200] * 200
    for req, resp in zip(requests, responses):
        got = resp.json()["result"]
        assert _ids(got) == [expected[q][: req["topk"]] for q in req["queries"]]
        assert all(("score" in hit) == req["return_scores"] for res in got for hit in res)
    after = httpx.get(server.url + "/health").json()
    assert after["queries"] - before["queries"] == sum(len(r["queries"]) for r in requests)


class _CountingRetriever(LocalRetriever):
    """The real retriever, recording the size of every call (and failing on a poisoned query)."""

    def __init__(self, inner: LocalRetriever) -> None:
        super().__init__(inner.index, inner.embedder)
        self.calls: list[int] = []

    def retrieve(self, queries, topk=3, return_scores=True):
        self.calls.append(len(queries))
        if "__poison__" in queries:
            raise RuntimeError("poisoned batch")
        return super().retrieve(queries, topk, return_scores)


@pytest.mark.parametrize("config, expected_calls", [
    (BatchingConfig(enabled=True, max_batch_queries=64, max_wait_ms=5), [12]),
    (BatchingConfig(enabled=True, max_batch_queries=5, max_wait_ms=5), [5, 5, 2]),  # requests sliced to fit
    (BatchingConfig(enabled=False), [2, 1] * 4),
])
def test_micro_batcher_merges_waiting_requests(retriever, config, expected_calls):
    counting = _CountingRetriever(retriever)
    reqs = [(["q a", "q b"] if i % 2 == 0 else ["q c"], 1 + i % 3, i % 2 == 0) for i in range(8)]

    async def scenario():
        batcher = MicroBatcher(counting, config)
        tasks = [asyncio.create_task(batcher.submit(*r)) for r in reqs]
        await asyncio.sleep(0)  # every request is queued before the worker starts
        batcher.start()
        try:
            return await asyncio.gather(*tasks)
        finally:
            await batcher.stop()

    results = asyncio.run(scenario())
    assert counting.calls == expected_calls
    for (queries, topk, scores), got in zip(reqs, results):
        assert _ids(got) == _ids(retriever.retrieve(queries, topk=topk))
        assert all(("score" in hit) == scores for res in got for hit in res)


def test_failure_inside_a_batch_is_a_500_and_the_server_carries_on(retriever):
    counting = _CountingRetriever(retriever)
    with ServerThread(create_app(counting, LIMITS)) as srv, httpx.Client(base_url=srv.url, timeout=60) as client:
        bad = client.post("/retrieve", json={"queries": ["__poison__"]})
        assert bad.status_code == 500 and "poisoned batch" in bad.json()["detail"]
        good = client.post("/retrieve", json={"queries": ["fine"], "topk": 2})
        assert good.status_code == 200 and len(good.json()["result"][0]) == 2
