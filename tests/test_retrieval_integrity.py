"""Index integrity: checksums in the manifest, `verify_index` and `serve` refusing changed files, clean exit 2 on
damaged files, and resume refusing a different embedding dtype or recipe."""

from __future__ import annotations

import hashlib
import json
import shutil

import numpy as np
import pytest
from retrieval_helpers import write_corpus

from rexrag_fast.cli import main
from rexrag_fast.data.world import generate_world
from rexrag_fast.retrieval import LocalRetriever, build_index, get_embedder, read_manifest
from rexrag_fast.retrieval.index import IndexIntegrityError, IndexMismatchError, verify_index
from rexrag_fast.retrieval.local import load_retriever

N_DOCS = 12


@pytest.fixture(scope="module")
def docs():
    return generate_world(seed=0).documents[:N_DOCS]


@pytest.fixture(scope="module")
def built(docs, tmp_path_factory):
    """A pristine index; tests corrupt copies of it."""
    root = tmp_path_factory.mktemp("pristine")
    corpus = write_corpus(root / "corpus.jsonl", docs)
    build_index(corpus, root / "idx", embedder=get_embedder(dtype="float32"), chunk_size=5, progress=False)
    return root


@pytest.fixture
def copy(built, tmp_path):
    """A copy of the pristine index and its corpus: (index dir, corpus path)."""
    shutil.copytree(built, tmp_path / "c")
    corpus, index_dir = tmp_path / "c" / "corpus.jsonl", tmp_path / "c" / "idx"
    manifest = read_manifest(index_dir)
    manifest["corpus_path"] = str(corpus)
    (index_dir / "manifest.json").write_text(json.dumps(manifest))
    return index_dir, corpus


def _sha(path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_manifest_records_checksums_dtype_and_recipe(built):
    idx = built / "idx"
    m = read_manifest(idx)
    assert m["index_sha256"] == _sha(idx / "index.faiss") and m["index_bytes"] == (idx / "index.faiss").stat().st_size
    assert m["spans_sha256"] == _sha(idx / "doc_spans.npy")
    assert m["corpus_sha256"] == _sha(built / "corpus.jsonl")
    assert (m["embedder_dtype"], m["pooling"], m["query_prefix"], m["passage_prefix"]) == ("float32", "model", "", "")
    verify_index(idx, corpus_path=built / "corpus.jsonl", progress=False)  # pristine: passes


def test_corpus_edited_in_place_at_the_same_size_is_refused(copy, docs):
    index_dir, corpus = copy
    data = corpus.read_bytes()
    pos = data.index(docs[3]["contents"][-8:].encode())
    corpus.write_bytes(data[:pos] + b"X" + data[pos + 1:])  # same size: only a re-hash sees it
    with pytest.raises(IndexIntegrityError, match=r"corpus .*corpus.jsonl has sha256"):
        verify_index(index_dir, progress=False)


def test_swapped_span_rows_are_refused(copy, docs):
    index_dir, _ = copy
    spans = np.load(index_dir / "doc_spans.npy")
    spans[[3, 4]] = spans[[4, 3]]
    np.save(index_dir / "doc_spans.npy", spans)
    # what verification prevents: doc 3's own text now retrieves doc 4
    (hits,) = LocalRetriever.from_index(index_dir, dtype="float32").retrieve([docs[3]["contents"]], topk=1)
    assert hits[0]["document"]["id"] == docs[4]["id"]
    with pytest.raises(IndexIntegrityError, match=r"doc spans .*doc_spans.npy has sha256"):
        verify_index(index_dir, progress=False)
    with pytest.raises(IndexIntegrityError, match="doc_spans.npy has sha256"):
        load_retriever(index_dir, verify=True)


def test_overwritten_vector_is_refused(copy):
    index_dir, _ = copy
    m = read_manifest(index_dir)
    data = bytearray((index_dir / "index.faiss").read_bytes())
    # IndexFlatIP stores its [N, D] float32 vectors at the end of the file; zero row 3.
    end = len(data) - (m["count"] - 4) * m["dimension"] * 4
    data[end - m["dimension"] * 4:end] = bytes(m["dimension"] * 4)
    (index_dir / "index.faiss").write_bytes(bytes(data))
    with pytest.raises(IndexIntegrityError, match=r"faiss index .*index.faiss has sha256"):
        verify_index(index_dir, progress=False)


def test_serve_refuses_a_changed_index_before_serving(copy, capsys):
    index_dir, _ = copy
    spans = np.load(index_dir / "doc_spans.npy")
    np.save(index_dir / "doc_spans.npy", spans[::-1].copy())
    assert main(["serve", "--index", str(index_dir), "--port", "1"]) == 2
    err = capsys.readouterr().err
    assert "doc_spans.npy has sha256" in err and "Rebuild the index" in err


@pytest.mark.parametrize("damage, message", [
    ("truncate_index", "index.faiss has 100 bytes"),
    ("truncate_spans", "doc_spans.npy has 100 bytes"),
    ("manifest_not_json", "manifest.json is not valid JSON"),
    ("index_garbled_same_size", "index.faiss is not a readable faiss index"),
])
@pytest.mark.parametrize("verify", [True, False])
def test_damaged_files_exit_2_with_a_message(copy, capsys, damage, message, verify):
    index_dir, _ = copy
    if damage == "truncate_index":
        (index_dir / "index.faiss").write_bytes((index_dir / "index.faiss").read_bytes()[:100])
    elif damage == "truncate_spans":
        (index_dir / "doc_spans.npy").write_bytes((index_dir / "doc_spans.npy").read_bytes()[:100])
    elif damage == "manifest_not_json":
        (index_dir / "manifest.json").write_text('{"format_version": 2, "count": ')
    else:
        size = (index_dir / "index.faiss").stat().st_size
        (index_dir / "index.faiss").write_bytes(b"\xff" * size)
    if damage == "index_garbled_same_size" and verify:
        message = "index.faiss has sha256"  # the re-hash sees it before faiss reads it
    args = ["serve", "--index", str(index_dir), "--port", "1"] + ([] if verify else ["--no-verify"])
    assert main(args) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err
    if not verify:
        assert "--no-verify: not re-hashing" in err


class _Crash(RuntimeError):
    pass


def _crash(k, n):
    raise _Crash("killed")


@pytest.mark.parametrize("field, resumed_with, value", [
    ("embedder_dtype", dict(dtype="bfloat16"), "'bfloat16'"),
    ("pooling", dict(dtype="float32", pooling="cls"), "'cls'"),
    ("query_prefix", dict(dtype="float32", query_prefix="query: "), "'query: '"),
])
def test_resume_with_another_dtype_or_recipe_is_refused(docs, tmp_path, field, resumed_with, value):
    corpus = write_corpus(tmp_path / "c.jsonl", docs)
    with pytest.raises(_Crash):
        build_index(corpus, tmp_path / "idx", embedder=get_embedder(dtype="float32"), chunk_size=5,
                    progress=False, on_chunk_done=_crash)
    with pytest.raises(IndexMismatchError, match=rf"{field}: partial build '.*', now {value}"):
        build_index(corpus, tmp_path / "idx", embedder=get_embedder(**resumed_with), chunk_size=5, progress=False)
    assert len(list((tmp_path / "idx" / "chunks").glob("emb_*.npy"))) == 1  # the fp32 chunk is kept, not mixed


def test_complete_index_is_reused_whatever_the_dtype(built):
    """The dtype only shapes a build (as the chunk size): a finished index is kept, recording its own dtype."""
    m = build_index(built / "corpus.jsonl", built / "idx", embedder=get_embedder(dtype="bfloat16"), chunk_size=7,
                    progress=False)
    assert m["embedder_dtype"] == "float32" and m == read_manifest(built / "idx")


def test_query_embedder_with_another_recipe_is_refused(built):
    with pytest.raises(IndexMismatchError, match="query_prefix ''.*'query: '"):
        LocalRetriever.from_index(built / "idx", embedder=get_embedder(dtype="float32", query_prefix="query: "))


def test_older_format_is_rebuilt_with_a_warning(copy):
    index_dir, corpus = copy
    manifest = read_manifest(index_dir)
    (index_dir / "manifest.json").write_text(json.dumps({**manifest, "format_version": 1}))
    with pytest.raises(IndexMismatchError, match="format_version 1"):
        read_manifest(index_dir)
    with pytest.warns(UserWarning, match="format 1.*rebuilding"):
        m = build_index(corpus, index_dir, embedder=get_embedder(dtype="float32"), chunk_size=5, progress=False)
    assert m["format_version"] == 2 and m["index_sha256"] == manifest["index_sha256"]
