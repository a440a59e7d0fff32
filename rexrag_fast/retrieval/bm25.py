"""Sparse BM25 retrieval over a Search-R1 corpus, for users of Search-R1's BM25 (pyserini) server.

Optional: needs the `bm25s` package (pure Python over numpy/scipy; `pip install 'rexrag-fast[bm25]'`), imported
only when a BM25 index is built or loaded. Scoring is Lucene's BM25 (Lucene >= 8 drops the constant (k1 + 1)
factor of the textbook numerator) with pyserini's defaults k1=0.9, b=0.4:

    score(q, d) = sum_{t in q} idf(t) * tf(t, d) / (tf(t, d) + k1 * (1 - b + b * |d| / avgdl))
    idf(t)      = ln(1 + (N - df(t) + 0.5) / (df(t) + 0.5))

Tokens: lower-cased words, English stop words removed, no stemming (pyserini also stems, with Porter).

Index directory layout:
    manifest.json   {"retriever": "bm25", "count", "k1", "b", "stopwords", "corpus_sha256", "corpus_path",
                     "corpus_bytes", "spans_sha256", "spans_bytes", "model_files": {path: {"bytes", "sha256"}},
                     ...}; written last (`verify_index` re-hashes all of them)
    bm25/           the bm25s model (vocabulary and the sparse score matrix)
    doc_spans.npy   [N, 2] int64 byte spans of the corpus rows, as for dense indexes
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

import numpy as np

from rexrag_fast.retrieval.corpus import DocStore, file_sha256, scan_corpus
from rexrag_fast.retrieval.index import (
    MANIFEST_FILE,
    SPANS_FILE,
    IndexMismatchError,
    LoadedIndex,
    atomic_write_text,
    check_file_sizes,
    load_spans,
    locate_corpus,
    read_json_object,
    write_spans,
)
from rexrag_fast.retrieval.local import check_queries

BM25_FORMAT_VERSION = 1
BM25_DIR = "bm25"
STOPWORDS = "en"


def import_bm25s() -> Any:
    """The bm25s module, or an ImportError saying what to install."""
    try:
        import bm25s
    except ImportError as e:
        raise ImportError("BM25 retrieval needs the optional package bm25s: pip install 'rexrag-fast[bm25]' "
                          "(or pip install bm25s)") from e
    return bm25s


def build_bm25_index(corpus_path: str | os.PathLike[str], out_dir: str | os.PathLike[str], k1: float = 0.9,
                     b: float = 0.4, progress: bool = True, overwrite: bool = False) -> dict[str, Any]:
    """Tokenize every row's "contents" of `corpus_path` and save a BM25 index into `out_dir`; returns the manifest.

    Memory: the token ids of the whole corpus at once (bm25s builds its sparse matrix in one go).
    """
    bm25s = import_bm25s()
    corpus_path, out = Path(corpus_path).resolve(), Path(out_dir)
    if (out / MANIFEST_FILE).is_file():
        if not overwrite:
            raise IndexMismatchError(f"{out} already holds an index; pass overwrite=True (--overwrite) or choose "
                                     "another output directory")
        (out / MANIFEST_FILE).unlink()
    sha, spans = scan_corpus(corpus_path, progress=progress)
    n_docs = int(spans.shape[0])
    if n_docs == 0:
        raise ValueError(f"corpus {corpus_path} has no rows")
    docs = DocStore(corpus_path, spans)
    try:
        texts = [docs.get(i)["contents"] for i in range(n_docs)]
    finally:
        docs.close()
    model = bm25s.BM25(k1=k1, b=b, method="lucene", idf_method="lucene")
    model.index(bm25s.tokenize(texts, stopwords=STOPWORDS, show_progress=progress), show_progress=progress)
    del texts
    out.mkdir(parents=True, exist_ok=True)
    shutil.rmtree(out / BM25_DIR, ignore_errors=True)
    model.save(str(out / BM25_DIR))
    model_files = {f"{BM25_DIR}/{f.name}": {"bytes": f.stat().st_size, "sha256": file_sha256(f)}
                   for f in sorted((out / BM25_DIR).iterdir()) if f.is_file()}
    manifest = {"format_version": BM25_FORMAT_VERSION, "retriever": "bm25", "count": n_docs, "k1": k1, "b": b,
                "method": "lucene", "stopwords": STOPWORDS, "stemmer": None, "bm25s_version": bm25s.__version__,
                "corpus_sha256": sha, "corpus_path": str(corpus_path), "corpus_bytes": corpus_path.stat().st_size,
                "model_files": model_files, **write_spans(spans, out / SPANS_FILE)}
    atomic_write_text(out / MANIFEST_FILE, json.dumps(manifest, indent=1))
    return manifest


class BM25Retriever(LoadedIndex):
    """BM25 retrieval in this process; `retrieve` answers exactly as `LocalRetriever.retrieve` does."""

    def __init__(self, model: Any, manifest: dict[str, Any], docs: DocStore, index_dir: Path) -> None:
        super().__init__(manifest, docs, index_dir)
        self.model = model

    @classmethod
    def from_index(cls, index_dir: str | os.PathLike[str],
                   corpus_path: str | os.PathLike[str] | None = None) -> BM25Retriever:
        """Load a directory written by `build_bm25_index` (corpus_path: where the corpus lives now)."""
        bm25s = import_bm25s()
        d = Path(index_dir)
        if not (d / MANIFEST_FILE).is_file():
            raise FileNotFoundError(f"{d} is not a complete BM25 index: {MANIFEST_FILE} is missing")
        manifest = read_json_object(d / MANIFEST_FILE)
        if manifest.get("retriever") != "bm25":
            raise IndexMismatchError(f"{d} is not a BM25 index (a dense one: load it with LocalRetriever)")
        corpus = locate_corpus(d, manifest, corpus_path)
        check_file_sizes(d, [(d / SPANS_FILE, manifest["spans_bytes"], "doc spans"),
                             (corpus, manifest["corpus_bytes"], "corpus")])
        spans = load_spans(d / SPANS_FILE, manifest["count"])
        model = bm25s.BM25.load(str(d / BM25_DIR))
        return cls(model, manifest, DocStore(corpus, spans), d)

    def __len__(self) -> int:
        return int(self.manifest["count"])

    def search(self, queries: list[str], topk: int) -> tuple[np.ndarray, np.ndarray]:
        """[Q] queries -> (scores [Q, k] float32, row ids [Q, k] int64), k = min(topk, N), best first."""
        bm25s = import_bm25s()
        k = min(topk, len(self))
        tokens = bm25s.tokenize(queries, stopwords=self.manifest["stopwords"], return_ids=False,
                                show_progress=False)
        ids, scores = self.model.retrieve(tokens, k=k, show_progress=False, n_threads=1)
        return np.asarray(scores, dtype=np.float32), np.asarray(ids, dtype=np.int64)

    def retrieve(self, queries: list[str], topk: int = 3, return_scores: bool = True) -> list[list[dict[str, Any]]]:
        """[Q] queries -> per query, the top-k documents best first (shapes as `LocalRetriever.retrieve`)."""
        check_queries(queries, topk)
        if not queries:
            return []
        scores, ids = self.search(queries, topk)
        out: list[list[dict[str, Any]]] = []
        for row_scores, row_ids in zip(scores.tolist(), ids.tolist()):
            hits = [(self.docs.get(i), s) for i, s in zip(row_ids, row_scores)]
            out.append([{"document": d, "score": s} for d, s in hits] if return_scores else [d for d, _ in hits])
        return out

