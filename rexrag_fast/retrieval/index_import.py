"""Serve an index a Search-R1 user already has without re-embedding it: `import_faiss_index` wraps their faiss
file (row i = corpus row i, e.g. e5_Flat.index over wiki-18) in our index layout (index.py): manifest with
checksums and the embedding recipe, doc spans, the faiss file hard-linked or copied. A sample of rows is
re-embedded with the given recipe and must reproduce the stored vectors, so a wrong --model, pooling or prefix
is refused instead of served.
"""

from __future__ import annotations

import dataclasses
import json
import os
import warnings
from pathlib import Path
from typing import Any

import numpy as np

from rexrag_fast.retrieval.corpus import DocStore, byte_progress, file_sha256, scan_corpus
from rexrag_fast.retrieval.embedder import DEFAULT_EMBEDDER, Embedder, get_embedder
from rexrag_fast.retrieval.index import (
    BUILD_STATE_FILE,
    INDEX_FILE,
    INDEX_FORMAT_VERSION,
    MANIFEST_FILE,
    SPANS_FILE,
    IndexConfig,
    IndexMismatchError,
    atomic_write_text,
    clear_index_dir,
    read_faiss,
    write_spans,
)


def import_faiss_index(faiss_path: str | os.PathLike[str], corpus_path: str | os.PathLike[str],
                       out_dir: str | os.PathLike[str], embedder: Embedder | str = DEFAULT_EMBEDDER,
                       progress: bool = True, overwrite: bool = False) -> dict[str, Any]:
    """Wrap a faiss index built elsewhere (e.g. Search-R1's e5_Flat.index over wiki-18) into an index directory.

    Row i of the faiss index must be row i of `corpus_path` (Search-R1 embeds the corpus in file order). The
    faiss file is hard-linked into `out_dir` when on the same filesystem, else copied; the manifest records the
    embedder with its pooling and prefixes (`embedder.pooling`, `.query_prefix`, `.passage_prefix`, set them to
    how the passages were embedded), so queries are embedded the same way. Checks: vector count = corpus rows,
    dimension = the embedder's, inner-product metric, and (flat/HNSW) that re-embedding the first 16 rows
    reproduces the stored vectors. Nothing else is re-embedded. Returns the manifest dict.
    """
    import faiss

    faiss_path, corpus_path, out = Path(faiss_path), Path(corpus_path).resolve(), Path(out_dir)
    if not faiss_path.is_file():
        raise FileNotFoundError(f"faiss index to import not found: {faiss_path}")
    emb = embedder if isinstance(embedder, Embedder) else get_embedder(embedder)
    if (out / MANIFEST_FILE).is_file() or (out / BUILD_STATE_FILE).is_file():
        if not overwrite:
            raise IndexMismatchError(f"{out} already holds an index; pass overwrite=True (--overwrite) or choose "
                                     "another output directory")
        clear_index_dir(out)
    sha, spans = scan_corpus(corpus_path, progress=progress)
    n_docs = int(spans.shape[0])

    # read_index returns the concrete class; IO_FLAG_MMAP maps the vectors instead of reading 60 GB into memory.
    index = read_faiss(faiss_path, faiss.IO_FLAG_MMAP)
    if index.ntotal != n_docs:
        raise IndexMismatchError(f"{faiss_path} holds {index.ntotal} vectors but corpus {corpus_path} has {n_docs} "
                                 "rows: row i of the index must be row i of the corpus it was built from")
    if index.d != emb.dimension:
        raise IndexMismatchError(f"{faiss_path} holds {index.d}-d vectors but embedder {emb.name!r} gives "
                                 f"{emb.dimension}-d vectors: pass the model the index was built with")
    if index.metric_type != faiss.METRIC_INNER_PRODUCT:
        raise IndexMismatchError(f"{faiss_path} uses faiss metric {index.metric_type}, expected inner product "
                                 f"({faiss.METRIC_INNER_PRODUCT}) over unit vectors as Search-R1's dense indexes")
    config = IndexConfig()
    if isinstance(index, faiss.IndexIVF):
        config = IndexConfig("ivf", nlist=int(index.nlist), nprobe=int(index.nprobe))
    elif isinstance(index, faiss.IndexHNSW):
        config = IndexConfig("hnsw", ef_search=int(index.hnsw.efSearch))
    elif not isinstance(index, faiss.IndexFlat):
        raise IndexMismatchError(f"{faiss_path} is a {type(index).__name__}; importable: flat, IVF and HNSW "
                                 "indexes (faiss index_factory 'Flat', 'IVF...', 'HNSW...')")
    normalized = None
    if not isinstance(index, faiss.IndexIVF):  # flat and HNSW storage give stored vectors back; IVF has no id map
        normalized = _check_imported_vectors(index, corpus_path, spans, emb, faiss_path)
    del index

    out.mkdir(parents=True, exist_ok=True)
    placed = _place_file(faiss_path, out / INDEX_FILE, progress)
    manifest = {"format_version": INDEX_FORMAT_VERSION, "corpus_sha256": sha, "embedder": emb.name,
                "embedder_dtype": None, "pooling": emb.pooling, "query_prefix": emb.query_prefix,
                "passage_prefix": emb.passage_prefix, "dimension": emb.dimension, "count": n_docs,
                "chunk_size": None, "index_type": config.index_type, "index_params": dataclasses.asdict(config),
                "corpus_path": str(corpus_path), "corpus_bytes": corpus_path.stat().st_size,
                "metric": "inner_product", "normalized": normalized, "imported_from": str(faiss_path.resolve()),
                **placed, **write_spans(spans, out / SPANS_FILE)}
    atomic_write_text(out / MANIFEST_FILE, json.dumps(manifest, indent=1))
    return manifest


# Mean cosine between re-embedded and stored passages that accepts an imported index: the same recipe in another
# dtype gives >= 0.998; a missing "passage: " prefix gave 0.98-0.99 and another pooling 0.2-0.5 (MiniLM, world docs).
IMPORT_MIN_COSINE = 0.995
IMPORT_SAMPLE_ROWS = 16


def _check_imported_vectors(index: Any, corpus_path: Path, spans: np.ndarray, emb: Embedder,
                            faiss_path: Path) -> bool:
    """Re-embed the first rows with `emb` and compare with the stored vectors: refuses a model, pooling or passage
    prefix other than the index was built with (its queries would be embedded wrongly). Returns whether the stored
    vectors are unit length."""
    n = min(int(spans.shape[0]), IMPORT_SAMPLE_ROWS)
    stored = index.reconstruct_n(0, n)
    norms = np.linalg.norm(stored, axis=1)
    docs = DocStore(corpus_path, spans)
    try:
        fresh = emb.embed_passages([docs.get(i)["contents"] for i in range(n)])
    finally:
        docs.close()
    cosine = float(np.mean(np.sum(fresh * stored, axis=1) / np.maximum(norms, 1e-12)))
    if cosine < IMPORT_MIN_COSINE:
        raise IndexMismatchError(
            f"{faiss_path}: the first {n} corpus rows embedded with {emb.name!r} (pooling {emb.pooling!r}, passage "
            f"prefix {emb.passage_prefix!r}) have mean cosine {cosine:.4f} to the stored vectors (>= "
            f"{IMPORT_MIN_COSINE} expected): pass the --model, --pooling and --passage-prefix the index was built "
            "with, and check that row i of the index is row i of the corpus")
    normalized = bool(np.all(np.abs(norms - 1.0) < 1e-3))
    if not normalized:
        warnings.warn(f"{faiss_path}: stored vectors are not unit length (norms {norms.min():.3f}.."
                      f"{norms.max():.3f}); scores are inner products, not cosines", stacklevel=3)
    return normalized


def _place_file(src: Path, dst: Path, progress: bool) -> dict[str, Any]:
    """Hard-link `src` to `dst` (a copy across filesystems), hashing it -> {"index_sha256", "index_bytes"}."""
    import hashlib

    tmp = dst.with_name(dst.name + ".tmp")
    tmp.unlink(missing_ok=True)
    try:
        os.link(src, tmp)
        sha = file_sha256(tmp, progress=progress, desc="hashing index")
    except OSError:  # another filesystem, or links not allowed: copy, hashing on the way
        digest = hashlib.sha256()
        with open(src, "rb") as fi, open(tmp, "wb") as fo, \
                byte_progress(src.stat().st_size, "copying index", progress) as bar:
            while block := fi.read(1 << 22):
                fo.write(block)
                digest.update(block)
                bar.update(len(block))
        sha = digest.hexdigest()
    os.replace(tmp, dst)
    return {"index_sha256": sha, "index_bytes": dst.stat().st_size}
