"""Optional BM25 retrieval (bm25s): Lucene BM25 scores, Search-R1 answer shapes, save/load, and the CLI."""

from __future__ import annotations

import importlib.util
import json
import math
import sys

import numpy as np
import pytest

from rexrag_fast.cli import main
from rexrag_fast.data.world import generate_world
from rexrag_fast.retrieval import read_manifest
from rexrag_fast.retrieval.bm25 import BM25Retriever, build_bm25_index
from rexrag_fast.retrieval.index import IndexIntegrityError, IndexMismatchError, verify_index
from rexrag_fast.retrieval.local import load_retriever

needs_bm25 = pytest.mark.skipif(importlib.util.find_spec("bm25s") is None,
                                reason="BM25 retrieval needs the optional extra: pip install 'rexrag-fast[bm25]'")

ROWS = [
    {"id": "a", "contents": '"Apple"\napple banana apple'},
    {"id": "b", "contents": '"Banana"\nbanana cherry'},
    {"id": "c", "contents": '"Cherry"\ncherry cherry cherry date'},
    {"id": "d", "contents": '"Date"\ndate elderberry fig grape'},
]


def _write(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def _lucene_bm25(query: list[str], docs: list[list[str]], k1: float = 0.9, b: float = 0.4) -> np.ndarray:
    """The module docstring's formula, term by term."""
    n, avgdl = len(docs), sum(map(len, docs)) / len(docs)
    scores = np.zeros(n)
    for t in query:
        df = sum(t in d for d in docs)
        idf = math.log(1 + (n - df + 0.5) / (df + 0.5))
        for i, d in enumerate(docs):
            tf = d.count(t)
            scores[i] += idf * tf / (tf + k1 * (1 - b + b * len(d) / avgdl))
    return scores


@needs_bm25
def test_scores_are_lucene_bm25_with_pyserini_defaults(tmp_path):
    corpus = _write(tmp_path / "c.jsonl", ROWS)
    build_bm25_index(corpus, tmp_path / "bm25", progress=False)
    retriever = BM25Retriever.from_index(tmp_path / "bm25")
    tokens = [r["contents"].replace('"', "").replace("\n", " ").lower().split() for r in ROWS]
    for query in ("cherry", "banana apple", "date grape"):
        expected = _lucene_bm25(query.split(), tokens)
        scores, ids = retriever.search([query], topk=4)
        np.testing.assert_allclose(scores[0], expected[ids[0]], rtol=1e-5)
        assert scores[0].tolist() == sorted(scores[0].tolist(), reverse=True)
    (hits,) = retriever.retrieve(["cherry"], topk=2)
    assert [h["document"]["id"] for h in hits] == ["c", "b"] and set(hits[0]) == {"document", "score"}
    (docs,) = retriever.retrieve(["grape"], topk=1, return_scores=False)
    assert docs == [ROWS[3]]
    assert len(retriever.retrieve(["cherry"], topk=50)[0]) == len(ROWS)


@needs_bm25
def test_world_titles_find_their_documents(tmp_path):
    docs = generate_world(seed=0).documents[:40]
    corpus = _write(tmp_path / "c.jsonl", docs)
    assert main(["index", "--bm25", "--corpus", str(corpus), "--out", str(tmp_path / "bm25")]) == 0
    retriever = load_retriever(tmp_path / "bm25", verify=True)
    assert isinstance(retriever, BM25Retriever)
    queries = [d["contents"] for d in docs]
    assert [r[0]["id"] for r in retriever.retrieve(queries, topk=1, return_scores=False)] == [d["id"] for d in docs]
    # the dense loader names the BM25 index instead of failing on a missing key
    with pytest.raises(IndexMismatchError, match="is a BM25 index"):
        read_manifest(tmp_path / "bm25")


@needs_bm25
def test_changed_corpus_and_existing_output_are_refused(tmp_path):
    corpus = _write(tmp_path / "c.jsonl", ROWS)
    build_bm25_index(corpus, tmp_path / "bm25", progress=False)
    with pytest.raises(IndexMismatchError, match="already holds an index"):
        build_bm25_index(corpus, tmp_path / "bm25", progress=False)
    verify_index(tmp_path / "bm25", progress=False)
    model_file = sorted((tmp_path / "bm25" / "bm25").glob("*.npy"))[0]
    data = bytearray(model_file.read_bytes())
    data[-1] ^= 0xFF  # one byte of the score matrix
    model_file.write_bytes(bytes(data))
    with pytest.raises(IndexIntegrityError, match=f"BM25 file bm25/{model_file.name} .* has sha256"):
        verify_index(tmp_path / "bm25", progress=False)
    _write(corpus, ROWS[:3])
    with pytest.raises(IndexIntegrityError, match="corpus .* bytes"):
        BM25Retriever.from_index(tmp_path / "bm25")


def test_without_bm25s_the_error_says_what_to_install(tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "bm25s", None)  # what `import bm25s` meets when the package is absent
    corpus = _write(tmp_path / "c.jsonl", ROWS)
    with pytest.raises(ImportError, match=r"pip install 'rexrag-fast\[bm25\]'"):
        build_bm25_index(corpus, tmp_path / "bm25", progress=False)
    assert main(["index", "--bm25", "--corpus", str(corpus), "--out", str(tmp_path / "bm25")]) == 2
    assert "needs the optional package bm25s" in capsys.readouterr().err
