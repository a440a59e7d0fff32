"""`rexrag-fast index` and `rexrag-fast serve` as a user runs them (serve in a real subprocess)."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time

import httpx
import pytest

from rexrag_fast.cli import main
from rexrag_fast.data.world import generate_world
from rexrag_fast.retrieval import RetrievalClient, read_manifest


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    path = tmp_path_factory.mktemp("cli") / "corpus.jsonl"
    with open(path, "w") as f:
        for d in generate_world(seed=0).documents[::150]:
            f.write(json.dumps(d) + "\n")
    return path


@pytest.fixture(scope="module")
def index_dir(corpus, tmp_path_factory):
    out = tmp_path_factory.mktemp("cli_index") / "idx"
    assert main(["index", "--corpus", str(corpus), "--out", str(out), "--chunk-size", "4"]) == 0
    return out


def test_index_command_writes_a_complete_index(index_dir, corpus, capsys):
    manifest = read_manifest(index_dir)
    assert manifest["count"] == len(corpus.read_text().splitlines()) and manifest["chunk_size"] == 4
    assert manifest["embedder"] == "all-MiniLM-L6-v2" and manifest["index_type"] == "flat"
    # same command again: the complete index is kept as it is
    before = (index_dir / "index.faiss").stat().st_mtime_ns
    assert main(["index", "--corpus", str(corpus), "--out", str(index_dir), "--chunk-size", "4"]) == 0
    assert main(["index", "--corpus", str(corpus), "--out", str(index_dir), "--chunk-size", "7"]) == 0
    assert (index_dir / "index.faiss").stat().st_mtime_ns == before
    printed = capsys.readouterr().out.split("\n}\n")
    assert json.loads(printed[-2] + "}")["corpus_sha256"] == manifest["corpus_sha256"]


def test_index_command_reports_bad_input(tmp_path, capsys):
    assert main(["index", "--corpus", str(tmp_path / "missing.jsonl"), "--out", str(tmp_path / "o")]) == 2
    assert "missing.jsonl" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["index", "--corpus", "c.jsonl", "--out", "o", "--index-type", "annoy"])


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_serve_command_answers_search_r1_requests(index_dir):
    port = _free_port()
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "rexrag_fast.cli", "serve", "--index", str(index_dir),
                             "--host", "127.0.0.1", "--port", str(port)],
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 180
        while True:
            if proc.poll() is not None:
                pytest.fail(f"serve exited with {proc.returncode}: {proc.stdout.read().decode()[-2000:]}")
            try:
                if httpx.get(f"http://127.0.0.1:{port}/health", timeout=1).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            if time.monotonic() > deadline:
                pytest.fail("serve did not answer /health within 180 s")
            time.sleep(0.25)
        with RetrievalClient(f"http://127.0.0.1:{port}/retrieve") as client:
            (hits,) = client.retrieve(["Who founded a company?"], topk=2)
            assert len(hits) == 2 and set(hits[0]) == {"document", "score"}
        empty_turn = httpx.post(f"http://127.0.0.1:{port}/retrieve", json={"queries": []})
        assert empty_turn.status_code == 200 and empty_turn.json() == {"result": []}
        bad = httpx.post(f"http://127.0.0.1:{port}/retrieve", json={"queries": "not a list"})
        assert bad.status_code == 422 and proc.poll() is None
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def test_serve_refuses_a_mismatched_embedder(index_dir, capsys):
    assert main(["serve", "--index", str(index_dir), "--embedder", "intfloat/e5-base-v2"]) == 2
    err = capsys.readouterr().err
    assert "built with embedder 'all-MiniLM-L6-v2'" in err and "intfloat/e5-base-v2" in err
