"""`rexrag-fast index --import-faiss`: serve a faiss index built the Search-R1 way (raw transformers, e5-style mean
pooling with "passage: " prefixes, faiss index_factory "Flat" inner product), without re-embedding."""

from __future__ import annotations

import hashlib
import json

import numpy as np
import pytest

from rexrag_fast.cli import main
from rexrag_fast.data.world import generate_world
from rexrag_fast.retrieval import IndexMismatchError, LocalRetriever, get_embedder, read_manifest
from rexrag_fast.retrieval.embedder import resolve_embedder_path
from rexrag_fast.retrieval.index import verify_index

N_DOCS = 24


def _search_r1_encode(model_dir: str, texts: list[str], prefix: str) -> np.ndarray:
    """Search-R1's encoder for e5: prefix, tokenize, mean over non-padding tokens, L2-normalise (fp32)."""
    import torch
    from transformers import AutoModel, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModel.from_pretrained(model_dir).eval()
    batch = tok([prefix + t for t in texts], max_length=256, padding=True, truncation=True, return_tensors="pt")
    with torch.no_grad():
        hidden = model(**batch).last_hidden_state
    mask = batch["attention_mask"][..., None].float()
    emb = (hidden * mask).sum(dim=1) / mask.sum(dim=1)
    return torch.nn.functional.normalize(emb, dim=-1).numpy()


@pytest.fixture(scope="module")
def search_r1_index(tmp_path_factory):
    """(faiss file, corpus, model dir, docs): a flat inner-product index over MiniLM, e5 recipe, corpus order."""
    import faiss

    root = tmp_path_factory.mktemp("sr1")
    docs = generate_world(seed=0).documents[:N_DOCS]
    corpus = root / "wiki-mini.jsonl"
    corpus.write_text("".join(json.dumps(d) + "\n" for d in docs))
    model_dir = resolve_embedder_path("all-MiniLM-L6-v2")
    vectors = _search_r1_encode(model_dir, [d["contents"] for d in docs], "passage: ")
    index = faiss.index_factory(vectors.shape[1], "Flat", faiss.METRIC_INNER_PRODUCT)
    index.add(vectors)
    faiss.write_index(index, str(root / "e5_Flat.index"))
    return root / "e5_Flat.index", corpus, model_dir, docs


E5_RECIPE = ["--pooling", "mean", "--query-prefix", "query: ", "--passage-prefix", "passage: "]


def test_imported_index_serves_with_the_recipe_it_was_built_with(search_r1_index, tmp_path):
    faiss_file, corpus, model_dir, docs = search_r1_index
    out = tmp_path / "imported"
    assert main(["index", "--import-faiss", str(faiss_file), "--corpus", str(corpus), "--model", model_dir,
                 "--out", str(out), "--dtype", "float32", *E5_RECIPE]) == 0
    m = read_manifest(out)
    assert (m["embedder"], m["pooling"], m["query_prefix"], m["passage_prefix"]) == \
        (model_dir, "mean", "query: ", "passage: ")
    assert m["count"] == N_DOCS and m["index_type"] == "flat" and m["normalized"] is True
    assert m["index_sha256"] == hashlib.sha256(faiss_file.read_bytes()).hexdigest()
    verify_index(out, progress=False)

    retriever = LocalRetriever.from_index(out, dtype="float32")
    assert (retriever.embedder.pooling, retriever.embedder.query_prefix) == ("mean", "query: ")
    queries = [d["contents"] for d in docs]
    # the query side embeds exactly as Search-R1 does for this index
    np.testing.assert_allclose(retriever.embedder.embed_queries(queries[:4]),
                               _search_r1_encode(model_dir, queries[:4], "query: "), atol=1e-5)
    results = retriever.retrieve(queries, topk=1, return_scores=False)
    assert [r[0] for r in results] == docs


def test_import_refuses_a_mismatch(search_r1_index, tmp_path, capsys):
    faiss_file, corpus, model_dir, docs = search_r1_index
    short = tmp_path / "short.jsonl"
    short.write_text("".join(json.dumps(d) + "\n" for d in docs[:-1]))
    assert main(["index", "--import-faiss", str(faiss_file), "--corpus", str(short), "--model", model_dir,
                 "--out", str(tmp_path / "a"), *E5_RECIPE]) == 2
    assert f"holds {N_DOCS} vectors but corpus" in capsys.readouterr().err
    # another pooling than the index was built with: the re-embedded first rows do not match the stored vectors
    assert main(["index", "--import-faiss", str(faiss_file), "--corpus", str(corpus), "--model", model_dir,
                 "--out", str(tmp_path / "c"), "--pooling", "cls", "--passage-prefix", "passage: "]) == 2
    assert "pooling 'cls'" in capsys.readouterr().err and not (tmp_path / "c" / "manifest.json").exists()
    assert main(["index", "--import-faiss", str(tmp_path / "nope.index"), "--corpus", str(corpus),
                 "--out", str(tmp_path / "b")]) == 2
    assert "nope.index" in capsys.readouterr().err


def test_imported_index_refuses_a_query_embedder_without_its_recipe(search_r1_index, tmp_path):
    faiss_file, corpus, model_dir, _ = search_r1_index
    out = tmp_path / "imported"
    assert main(["index", "--import-faiss", str(faiss_file), "--corpus", str(corpus), "--model", model_dir,
                 "--out", str(out), *E5_RECIPE]) == 0
    with pytest.raises(IndexMismatchError, match="pooling 'mean'.*'model'"):
        LocalRetriever.from_index(out, embedder=get_embedder(model_dir, dtype="float32"))
