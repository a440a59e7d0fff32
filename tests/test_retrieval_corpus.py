"""Streaming corpus reader, DocStore random access, and Search-R1 passage formatting."""

from __future__ import annotations

import hashlib
import json
from concurrent.futures import ThreadPoolExecutor

import pytest

from rexrag_fast.retrieval import format_passages, split_contents
from rexrag_fast.retrieval.corpus import CorpusFormatError, DocStore, iter_corpus, iter_corpus_chunks, scan_corpus


def _write(path, rows, blank_every: int = 0):
    with open(path, "w", encoding="utf-8") as f:
        for i, row in enumerate(rows):
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
            if blank_every and i % blank_every == 0:
                f.write("\n")
    return path


ROWS = [{"id": str(i), "contents": f'"Title {i}"\nText number {i} – ünïcödé {"x" * (i % 7)}'} for i in range(37)]


@pytest.mark.parametrize("blank_every", [0, 5])
def test_scan_gives_sha256_and_row_spans(tmp_path, blank_every):
    path = _write(tmp_path / "c.jsonl", ROWS, blank_every)
    sha, spans = scan_corpus(path)
    assert sha == hashlib.sha256(path.read_bytes()).hexdigest()
    assert spans.shape == (len(ROWS), 2) and spans.dtype.name == "int64"
    data = path.read_bytes()
    assert [json.loads(data[s:e]) for s, e in spans.tolist()] == ROWS
    assert list(iter_corpus(path)) == ROWS


@pytest.mark.parametrize("chunk_size", [1, 8, 37, 100])
def test_chunks_cover_the_corpus_in_order(tmp_path, chunk_size):
    path = _write(tmp_path / "c.jsonl", ROWS)
    chunks = list(iter_corpus_chunks(path, chunk_size))
    assert [r for c in chunks for r in c] == ROWS
    assert all(len(c) == chunk_size for c in chunks[:-1]) and 1 <= len(chunks[-1]) <= chunk_size


def test_docstore_random_access_from_threads(tmp_path):
    path = _write(tmp_path / "c.jsonl", ROWS, blank_every=3)
    store = DocStore(path, scan_corpus(path)[1])
    order = [(i * 7) % len(ROWS) for i in range(200)]
    with ThreadPoolExecutor(8) as ex:
        got = list(ex.map(store.get, order))
    assert got == [ROWS[i] for i in order]
    with pytest.raises(IndexError, match="out of range"):
        store.get(len(ROWS))
    store.close()


def test_integer_ids_become_strings(tmp_path):
    path = _write(tmp_path / "c.jsonl", [{"id": 7, "contents": '"T"\nx', "title": "T"}])
    assert list(iter_corpus(path)) == [{"id": "7", "contents": '"T"\nx', "title": "T"}]


@pytest.mark.parametrize("line, message", [
    ("{not json", r"c.jsonl:2: not valid JSON"),
    ("[1, 2]", "expected a JSON object"),
    ('{"id": "1"}', "'contents' must be a string"),
    ('{"contents": "x"}', "has no 'id'"),
])
def test_bad_rows_are_named_with_their_line(tmp_path, line, message):
    path = tmp_path / "c.jsonl"
    path.write_text(json.dumps(ROWS[0]) + "\n" + line + "\n")
    with pytest.raises(CorpusFormatError, match=message):
        list(iter_corpus(path))


def test_missing_corpus_is_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.jsonl"):
        scan_corpus(tmp_path / "nope.jsonl")


def test_format_passages_as_search_r1():
    results = [
        {"document": {"id": "1", "contents": '"Alpha"\nFirst line.\nSecond line.'}, "score": 0.9},
        {"document": {"id": "2", "contents": '"Beta"\nOnly line.'}, "score": 0.5},
    ]
    expected = 'Doc 1(Title: "Alpha") First line.\nSecond line.\nDoc 2(Title: "Beta") Only line.\n'
    assert format_passages(results) == expected
    assert format_passages([r["document"] for r in results]) == expected
    assert format_passages([]) == ""
    assert split_contents('"T"') == ('"T"', "")
