"""faiss index build/load: recall on the embedded world, exactness, index types, resume after a crash, manifest
checks, and the e5 embedder treatment."""

from __future__ import annotations

import contextlib
import json
import random

import numpy as np
import pytest
from retrieval_helpers import write_corpus

from rexrag_fast.data.world import generate_world
from rexrag_fast.retrieval import (
    DenseIndex,
    Embedder,
    IndexConfig,
    IndexMismatchError,
    LocalRetriever,
    build_index,
    get_embedder,
    read_manifest,
)
from rexrag_fast.retrieval.embedder import resolve_embedder_dtype, resolve_embedder_path
from rexrag_fast.retrieval.index import verify_index

N_QUESTIONS = 60
N_DISTRACTORS = 100


@pytest.fixture(scope="module")
def world_subset(tmp_path_factory):
    """The default world's first 1-hop questions, their documents and random distractors from the same world."""
    world = generate_world(seed=0)
    questions = [q for q in world.questions if q["type"] == "1hop"][:N_QUESTIONS]
    needed = {q["supporting_docs"][0] for q in questions}
    rng = random.Random(0)
    docs = [d for d in world.documents if d["id"] in needed]
    docs += rng.sample([d for d in world.documents if d["id"] not in needed], N_DISTRACTORS)
    rng.shuffle(docs)
    path = write_corpus(tmp_path_factory.mktemp("world") / "corpus.jsonl", docs)
    return path, docs, questions


@pytest.fixture(scope="module")
def flat_index(world_subset, tmp_path_factory):
    path, _, _ = world_subset
    out = tmp_path_factory.mktemp("flat")
    build_index(path, out, chunk_size=64, progress=False, keep_chunks=True)
    return out


def test_one_hop_recall_at_3_on_the_embedded_world(world_subset, flat_index):
    _, docs, questions = world_subset
    retriever = LocalRetriever.from_index(flat_index)
    results = retriever.retrieve([q["question"] for q in questions], topk=3)
    hits = [q["supporting_docs"][0] in [r["document"]["id"] for r in res] for q, res in zip(questions, results)]
    recall = sum(hits) / len(hits)
    # Fixed world (seed 0) and fixed model: measured 1.00 when written; a drop means a retrieval regression.
    assert recall >= 0.95, f"recall@3 {recall:.3f} over {len(hits)} 1-hop questions"
    assert all(len(res) == 3 for res in results)
    assert all(res[0]["score"] >= res[1]["score"] >= res[2]["score"] for res in results)
    by_id = {d["id"]: d for d in docs}
    assert all(r["document"] == by_id[r["document"]["id"]] for res in results for r in res)


def test_flat_search_is_exact_inner_product(world_subset, flat_index):
    _, docs, questions = world_subset
    manifest = read_manifest(flat_index)
    assert manifest["count"] == len(docs) and manifest["dimension"] == 384
    assert manifest["embedder"] == "all-MiniLM-L6-v2" and manifest["index_type"] == "flat"
    vectors = np.concatenate([np.load(p) for p in sorted((flat_index / "chunks").glob("emb_*.npy"))])
    assert vectors.shape == (len(docs), 384)
    np.testing.assert_allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=1e-5)
    index = DenseIndex.load(flat_index)
    q = get_embedder().embed_queries([x["question"] for x in questions[:10]])
    scores, ids = index.search(q, 5)
    brute = q @ vectors.T
    np.testing.assert_array_equal(ids, np.argsort(-brute, axis=1, kind="stable")[:, :5])
    np.testing.assert_allclose(scores, np.take_along_axis(brute, ids, axis=1), rtol=1e-5, atol=1e-5)


def test_topk_larger_than_corpus_and_empty_query_list(world_subset, flat_index):
    _, docs, _ = world_subset
    retriever = LocalRetriever.from_index(flat_index)
    (res,) = retriever.retrieve(["anything"], topk=len(docs) + 50, return_scores=False)
    assert len(res) == len(docs) and {d["id"] for d in res} == {d["id"] for d in docs}
    assert retriever.retrieve([], topk=3) == []
    with pytest.raises(ValueError, match="topk"):
        retriever.retrieve(["x"], topk=0)
    with pytest.raises(TypeError, match="list of str"):
        retriever.retrieve("a single string", topk=3)


def test_ivf_and_hnsw_agree_with_flat(world_subset, tmp_path):
    path, docs, questions = world_subset
    small = write_corpus(tmp_path / "small.jsonl", docs[:48])
    build_index(small, tmp_path / "flat", chunk_size=48, progress=False)
    flat = LocalRetriever.from_index(tmp_path / "flat")
    queries = [d["contents"] for d in docs[:48:6]] + [q["question"] for q in questions[:5]]
    ids = lambda rs: [[r["document"]["id"] for r in res] for res in rs]
    expected = ids(flat.retrieve(queries, topk=3))
    for config in (IndexConfig("ivf", nlist=2, nprobe=2), IndexConfig("hnsw", hnsw_m=16)):
        out = tmp_path / config.index_type
        small_ivf = pytest.warns(UserWarning, match="fewer than 39 training points") \
            if config.index_type == "ivf" else contextlib.nullcontext()
        with small_ivf:
            build_index(small, out, config=config, chunk_size=48, progress=False)
        assert read_manifest(out)["index_type"] == config.index_type
        # ivf probing every cluster and hnsw on 48 points are exhaustive: the same top 3 as exact search
        assert ids(LocalRetriever.from_index(out).retrieve(queries, topk=3)) == expected, config.index_type


class _Crash(RuntimeError):
    pass


def test_resume_after_crash_gives_the_same_index(world_subset, tmp_path):
    _, docs, _ = world_subset
    corpus = write_corpus(tmp_path / "c.jsonl", docs[:22])
    build_index(corpus, tmp_path / "fresh", chunk_size=6, progress=False)

    def crash_after_third(k, n):
        if k == 2:
            raise _Crash(f"injected crash after chunk {k} of {n}")

    out = tmp_path / "resumed"
    with pytest.raises(_Crash):
        build_index(corpus, out, chunk_size=6, progress=False, on_chunk_done=crash_after_third)
    assert sorted(p.name for p in (out / "chunks").glob("emb_*.npy")) == [f"emb_{k:06d}.npy" for k in range(3)]
    with pytest.raises(FileNotFoundError, match="resume"):
        read_manifest(out)

    embedded_now: list[int] = []
    build_index(corpus, out, chunk_size=6, progress=False, on_chunk_done=lambda k, n: embedded_now.append(k))
    assert embedded_now == [3]  # completed chunks were kept, not recomputed
    assert (out / "index.faiss").read_bytes() == (tmp_path / "fresh" / "index.faiss").read_bytes()
    assert (out / "doc_spans.npy").read_bytes() == (tmp_path / "fresh" / "doc_spans.npy").read_bytes()
    fresh_m, resumed_m = read_manifest(tmp_path / "fresh"), read_manifest(out)
    assert {k: v for k, v in fresh_m.items() if k != "corpus_path"} == \
        {k: v for k, v in resumed_m.items() if k != "corpus_path"}
    assert not (out / "chunks").exists() and not (out / "build.json").exists()


def test_partial_build_with_other_settings_is_refused(world_subset, tmp_path):
    _, docs, _ = world_subset
    corpus = write_corpus(tmp_path / "c.jsonl", docs[:12])

    def crash(k, n):
        raise _Crash("stop")

    with pytest.raises(_Crash):
        build_index(corpus, tmp_path / "idx", chunk_size=8, progress=False, on_chunk_done=crash)
    with pytest.raises(IndexMismatchError, match="chunk_size"):
        build_index(corpus, tmp_path / "idx", chunk_size=4, progress=False)
    manifest = build_index(corpus, tmp_path / "idx", chunk_size=4, progress=False, overwrite=True)
    assert manifest["count"] == 12 and manifest["chunk_size"] == 4


@pytest.fixture(scope="module")
def e5_named_embedder(tmp_path_factory) -> Embedder:
    """The bundled MiniLM weights under a directory whose name says e5: gets the e5 treatment."""
    link = tmp_path_factory.mktemp("models") / "e5-mini-test"
    link.symlink_to(resolve_embedder_path("all-MiniLM-L6-v2"), target_is_directory=True)
    return Embedder(str(link), device="cpu", dtype="float32")


def test_e5_models_get_prefixes_and_mean_pooling(e5_named_embedder):
    # fp32 on both sides: the comparison is about prefixes and pooling, not bf16 rounding.
    base = get_embedder(dtype="float32")
    assert e5_named_embedder.is_e5 and not base.is_e5
    texts = ["Who founded Defur Company?", "a much longer question about the capital of a fictional country"]
    np.testing.assert_allclose(e5_named_embedder.embed_queries(texts),
                               base.embed_queries(["query: " + t for t in texts]), atol=1e-5)
    np.testing.assert_allclose(e5_named_embedder.embed_passages(texts),
                               base.embed_passages(["passage: " + t for t in texts]), atol=1e-5)


def test_mismatched_embedder_is_refused(world_subset, flat_index, e5_named_embedder):
    path, _, _ = world_subset
    with pytest.raises(IndexMismatchError, match=r"built with embedder 'all-MiniLM-L6-v2'.*e5-mini-test"):
        DenseIndex.load(flat_index, embedder=e5_named_embedder.name)
    with pytest.raises(IndexMismatchError, match="built with embedder 'all-MiniLM-L6-v2'"):
        LocalRetriever.from_index(flat_index, embedder=e5_named_embedder)
    with pytest.raises(IndexMismatchError, match="already holds a different index"):
        build_index(path, flat_index, embedder=e5_named_embedder, chunk_size=64, progress=False)


def test_embedder_dtype_auto_and_bad_dtype():
    import torch

    assert resolve_embedder_dtype("auto", "cuda:0") == "float16"
    native_bf16 = torch.ops.mkldnn._is_mkldnn_bf16_supported()
    assert resolve_embedder_dtype("auto", "cpu") == ("bfloat16" if native_bf16 else "float32")
    assert resolve_embedder_dtype("float32", "cuda") == "float32"
    with pytest.raises(ValueError, match=r"'fp8' is not one of"):
        resolve_embedder_dtype("fp8", "cpu")


def test_bf16_embeddings_are_unit_vectors_close_to_fp32(world_subset):
    _, docs, questions = world_subset
    texts = [q["question"] for q in questions[:16]] + [d["contents"] for d in docs[:16]]
    fp32 = get_embedder(dtype="float32").embed_passages(texts)
    bf16 = get_embedder(dtype="bfloat16").embed_passages(texts)
    assert bf16.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(bf16, axis=1), 1.0, atol=1e-5)
    cosine = (fp32 * bf16).sum(axis=1)
    assert cosine.min() > 0.99, f"bf16 embeddings drift from fp32: min cosine {cosine.min():.4f}"


def test_changed_corpus_is_refused(world_subset, tmp_path):
    _, docs, _ = world_subset
    corpus = write_corpus(tmp_path / "c.jsonl", docs[:6])
    build_index(corpus, tmp_path / "idx", chunk_size=8, progress=False)
    with open(corpus, "a") as f:
        f.write(json.dumps({"id": "new", "contents": '"New"\nadded later'}) + "\n")
    with pytest.raises(IndexMismatchError, match="bytes"):
        DenseIndex.load(tmp_path / "idx")


def test_bad_build_arguments(tmp_path):
    corpus = write_corpus(tmp_path / "c.jsonl", [{"id": "1", "contents": '"A"\nb'}])
    with pytest.raises(ValueError, match="index_type"):
        build_index(corpus, tmp_path / "i", config=IndexConfig("annoy"), progress=False)
    with pytest.raises(ValueError, match="chunk_size"):
        build_index(corpus, tmp_path / "i", chunk_size=0, progress=False)
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n")
    with pytest.raises(ValueError, match="no rows"):
        build_index(empty, tmp_path / "i2", progress=False)


def test_build_and_verify_show_progress_to_the_end(world_subset, tmp_path, capsys):
    """tqdm bars (rate and ETA) on the corpus scan, embedding, faiss add, index write and verification hashes."""
    _, docs, _ = world_subset
    corpus = write_corpus(tmp_path / "c.jsonl", docs[:9])
    build_index(corpus, tmp_path / "idx", chunk_size=4, progress=True)
    verify_index(tmp_path / "idx", progress=True)
    lines = capsys.readouterr().err.replace("\r", "\n").splitlines()
    for desc in ("scanning c.jsonl", "embedding corpus", "faiss add", "writing index", "verifying doc spans",
                 "verifying faiss index", "verifying corpus"):
        assert any(line.startswith(f"{desc}: 100%") for line in lines), (desc, lines)


@pytest.mark.slow
def test_for_world_recall_on_the_full_default_world(tmp_path, monkeypatch):
    """The whole default world (~2,000 documents) indexed by LocalRetriever.for_world, as the CPU configs use it."""
    from rexrag_fast.data.world import World, default_world_dir

    monkeypatch.setenv("REXRAG_CACHE", str(tmp_path))
    retriever = LocalRetriever.for_world()
    world = World.load(default_world_dir())
    assert len(retriever) == len(world.documents)
    questions = [q for q in world.split("test") if q["type"] == "1hop"]
    results = retriever.retrieve([q["question"] for q in questions], topk=3)
    hits = [q["supporting_docs"][0] in [r["document"]["id"] for r in res] for q, res in zip(questions, results)]
    recall = sum(hits) / len(hits)
    # measured 1.000 (146 questions) when written
    assert recall >= 0.95, f"recall@3 {recall:.3f} over {len(hits)} 1-hop test questions of the default world"
    # a second call reuses the cached index
    assert LocalRetriever.for_world().index.manifest == retriever.index.manifest
