"""Dense faiss index over a corpus: chunked, resumable build with a manifest, and a checked loader.

Index directory layout:
    manifest.json     {"embedder", "dimension", "count", "corpus_sha256", "corpus_path", "corpus_bytes",
                       "index_type", "index_params", "metric": "inner_product", "chunk_size", ...}; written last,
                       so its presence means the build completed
    index.faiss       the faiss index (vectors are L2-normalised, so inner product = cosine similarity)
    doc_spans.npy     [N, 2] int64 byte spans of the corpus rows: row i of the index is document i
    build.json        settings of a build in progress (corpus checksum, embedder, chunk size, index config)
    chunks/emb_K.npy  embeddings of rows [K*chunk_size, (K+1)*chunk_size), written atomically

Bounded memory while embedding: one chunk of text and vectors at a time. A crashed build restarted with the same
arguments keeps its completed chunks and embeds only the rest; the result is the same index. Index types:
"flat" (exact, IndexFlatIP, what Search-R1 serves), "ivf" (IndexIVFFlat, nlist clusters, nprobe probed) and
"hnsw" (IndexHNSWFlat, graph with M links; its multi-threaded construction is not bit-reproducible).
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import shutil
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from rexrag_fast.retrieval.corpus import DocStore, scan_corpus
from rexrag_fast.retrieval.embedder import DEFAULT_EMBEDDER, Embedder, get_embedder

INDEX_FORMAT_VERSION = 1
INDEX_TYPES = ("flat", "ivf", "hnsw")
MANIFEST_FILE = "manifest.json"
INDEX_FILE = "index.faiss"
SPANS_FILE = "doc_spans.npy"
BUILD_STATE_FILE = "build.json"
CHUNK_DIR = "chunks"


class IndexMismatchError(ValueError):
    """An index directory does not match what the caller asked for (embedder, dimension, corpus)."""


@dataclasses.dataclass
class IndexConfig:
    """Which faiss index to build and how to search it.

    index_type: "flat" | "ivf" | "hnsw". ivf: nlist clusters (default 4*sqrt(N), at most N/39), nprobe
    clusters searched. hnsw: hnsw_m links per node, ef_construction / ef_search beam widths.
    """

    index_type: str = "flat"
    nlist: int | None = None
    nprobe: int = 32
    hnsw_m: int = 32
    ef_construction: int = 200
    ef_search: int = 128

    def validate(self) -> None:
        if self.index_type not in INDEX_TYPES:
            raise ValueError(f"index_type must be one of {INDEX_TYPES}, got {self.index_type!r}")
        for name in ("nprobe", "hnsw_m", "ef_construction", "ef_search"):
            if getattr(self, name) < 1:
                raise ValueError(f"IndexConfig.{name} must be >= 1, got {getattr(self, name)}")
        if self.nlist is not None and self.nlist < 1:
            raise ValueError(f"IndexConfig.nlist must be >= 1, got {self.nlist}")


ChunkCallback = Callable[[int, int], None]


def build_index(corpus_path: str | os.PathLike[str], out_dir: str | os.PathLike[str],
                embedder: Embedder | str = DEFAULT_EMBEDDER, config: IndexConfig | None = None,
                chunk_size: int = 4096, progress: bool = True, on_chunk_done: ChunkCallback | None = None,
                keep_chunks: bool = False, overwrite: bool = False) -> dict[str, Any]:
    """Embed every row of `corpus_path` and save a faiss index with its manifest into `out_dir`.

    Rows are embedded `chunk_size` at a time; each finished chunk [n, D] float32 is saved before the next starts,
    and `on_chunk_done(k, n_chunks)` runs after chunk k is saved. Re-running after a crash (same chunk_size) resumes
    from the saved chunks. If `out_dir` already holds a complete index of the same corpus, embedder and config (any
    chunk_size), nothing is rebuilt. Returns the manifest dict.
    """
    import faiss

    config = config or IndexConfig()
    config.validate()
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    corpus_path = Path(corpus_path).resolve()
    out = Path(out_dir)
    emb = embedder if isinstance(embedder, Embedder) else get_embedder(embedder)

    sha, spans = scan_corpus(corpus_path)
    n_docs = int(spans.shape[0])
    if n_docs == 0:
        raise ValueError(f"corpus {corpus_path} has no rows")
    wanted = {"format_version": INDEX_FORMAT_VERSION, "corpus_sha256": sha, "embedder": emb.name,
              "dimension": emb.dimension, "count": n_docs, "chunk_size": chunk_size,
              "index_type": config.index_type, "index_params": dataclasses.asdict(config)}

    manifest_path = out / MANIFEST_FILE
    if manifest_path.is_file() and not overwrite:
        existing = json.loads(manifest_path.read_text())
        # The chunk size only shapes the build, not what the finished index means.
        if all(existing.get(k) == v for k, v in wanted.items() if k != "chunk_size"):
            return existing
        raise IndexMismatchError(f"{out} already holds a different index ({_describe(existing)}); "
                                 "pass overwrite=True (--overwrite) or choose another output directory")
    state_path = out / BUILD_STATE_FILE
    if state_path.is_file() and not overwrite:
        state = json.loads(state_path.read_text())
        if state != wanted:
            diff = sorted(k for k in wanted if state.get(k) != wanted[k])
            raise IndexMismatchError(f"{out} holds a partial build with different {', '.join(diff)}; pass "
                                     "overwrite=True (--overwrite) to discard it or choose another output directory")
    elif overwrite and out.exists():
        for name in (MANIFEST_FILE, INDEX_FILE, SPANS_FILE, BUILD_STATE_FILE):
            (out / name).unlink(missing_ok=True)
        shutil.rmtree(out / CHUNK_DIR, ignore_errors=True)
    chunk_dir = out / CHUNK_DIR
    chunk_dir.mkdir(parents=True, exist_ok=True)
    _atomic_write_text(state_path, json.dumps(wanted, indent=1))

    n_chunks = math.ceil(n_docs / chunk_size)
    docs = DocStore(corpus_path, spans)
    try:
        _embed_chunks(docs, emb, chunk_dir, chunk_size, n_chunks, progress, on_chunk_done)
    finally:
        docs.close()

    index = _new_index(config, emb.dimension, n_docs)
    if config.index_type == "ivf":
        index.train(_training_sample(chunk_dir, n_chunks, n_docs, index.nlist * 64))
    for k in range(n_chunks):
        index.add(np.load(_chunk_path(chunk_dir, k)))
    if index.ntotal != n_docs:
        raise RuntimeError(f"index holds {index.ntotal} vectors but the corpus has {n_docs} rows")

    tmp_index = out / (INDEX_FILE + ".tmp")
    faiss.write_index(index, str(tmp_index))
    os.replace(tmp_index, out / INDEX_FILE)
    tmp_spans = out / (SPANS_FILE + ".tmp.npy")
    np.save(tmp_spans, spans)
    os.replace(tmp_spans, out / SPANS_FILE)
    manifest = {**wanted, "corpus_path": str(corpus_path), "corpus_bytes": corpus_path.stat().st_size,
                "metric": "inner_product", "normalized": True}
    if config.index_type == "ivf":
        manifest["ivf_nlist"] = int(index.nlist)
    _atomic_write_text(manifest_path, json.dumps(manifest, indent=1))
    state_path.unlink(missing_ok=True)
    if not keep_chunks:
        shutil.rmtree(chunk_dir, ignore_errors=True)
    return manifest


def read_manifest(index_dir: str | os.PathLike[str]) -> dict[str, Any]:
    """The manifest of a complete index directory (clear errors for an incomplete or foreign one)."""
    d = Path(index_dir)
    path = d / MANIFEST_FILE
    if not path.is_file():
        hint = " (a build is in progress or crashed: run the same index command again to resume)" \
            if (d / BUILD_STATE_FILE).is_file() else ""
        raise FileNotFoundError(f"{d} is not a complete rexrag-fast index: {MANIFEST_FILE} is missing{hint}")
    manifest = json.loads(path.read_text())
    if manifest.get("format_version") != INDEX_FORMAT_VERSION:
        raise IndexMismatchError(f"{path}: format_version {manifest.get('format_version')!r}, this code reads "
                                 f"{INDEX_FORMAT_VERSION}; rebuild the index")
    return manifest


class DenseIndex:
    """A loaded index directory: faiss index + manifest + the corpus rows it points to."""

    def __init__(self, index: Any, manifest: dict[str, Any], docs: DocStore, index_dir: Path) -> None:
        self.index = index
        self.manifest = manifest
        self.docs = docs
        self.index_dir = index_dir

    @classmethod
    def load(cls, index_dir: str | os.PathLike[str], embedder: str | None = None,
             corpus_path: str | os.PathLike[str] | None = None, verify_corpus: bool = False,
             use_gpu: bool | None = None) -> DenseIndex:
        """Load `index_dir`, refusing it if it was built with a different embedder than `embedder`.

        corpus_path: where the corpus lives now (default: the path recorded at build time). Its size is checked
        against the manifest; verify_corpus=True also re-hashes it (slow for large corpora).
        use_gpu: move a flat/ivf index to all GPUs with faiss-gpu (default: when faiss-gpu sees a GPU).
        """
        import faiss

        d = Path(index_dir)
        manifest = read_manifest(d)
        if embedder is not None and embedder != manifest["embedder"]:
            raise IndexMismatchError(
                f"index {d} was built with embedder {manifest['embedder']!r} (dimension {manifest['dimension']}), "
                f"but embedder {embedder!r} was requested: query vectors from a different model are meaningless "
                f"against it. Use embedder {manifest['embedder']!r}, or rebuild with "
                f"`rexrag-fast index --corpus ... --out ... --embedder {embedder}`")
        corpus = Path(corpus_path) if corpus_path is not None else Path(manifest["corpus_path"])
        if not corpus.is_file():
            raise FileNotFoundError(f"index {d}: its corpus {corpus} is missing (pass corpus_path=/--corpus)")
        if corpus.stat().st_size != manifest["corpus_bytes"]:
            raise IndexMismatchError(f"index {d}: corpus {corpus} has {corpus.stat().st_size} bytes, the index "
                                     f"was built from {manifest['corpus_bytes']} bytes; rebuild the index")
        if verify_corpus:
            sha, _ = scan_corpus(corpus)
            if sha != manifest["corpus_sha256"]:
                raise IndexMismatchError(f"index {d}: corpus {corpus} has sha256 {sha}, the index was built "
                                         f"from {manifest['corpus_sha256']}; rebuild the index")
        index = faiss.read_index(str(d / INDEX_FILE))
        if index.ntotal != manifest["count"] or index.d != manifest["dimension"]:
            raise IndexMismatchError(f"{d / INDEX_FILE} holds {index.ntotal} x {index.d} vectors, the manifest "
                                     f"says {manifest['count']} x {manifest['dimension']}")
        params = manifest["index_params"]
        if manifest["index_type"] == "ivf":
            index.nprobe = params["nprobe"]
        elif manifest["index_type"] == "hnsw":
            index.hnsw.efSearch = params["ef_search"]
        gpu_ok = hasattr(faiss, "StandardGpuResources") and faiss.get_num_gpus() > 0
        if use_gpu and not gpu_ok:
            raise RuntimeError("use_gpu=True but faiss sees no GPU: install faiss-gpu (pip install faiss-gpu)")
        if (use_gpu or (use_gpu is None and gpu_ok)) and manifest["index_type"] != "hnsw":
            index = faiss.index_cpu_to_all_gpus(index)
        spans = np.load(d / SPANS_FILE, mmap_mode="r")
        return cls(index, manifest, DocStore(corpus, spans), d)

    def __len__(self) -> int:
        return int(self.manifest["count"])

    @property
    def dimension(self) -> int:
        return int(self.manifest["dimension"])

    def search(self, query_emb: np.ndarray, topk: int) -> tuple[np.ndarray, np.ndarray]:
        """query_emb [Q, D] float32 -> (scores [Q, k], row ids [Q, k] int64), k = min(topk, N), best first."""
        if query_emb.ndim != 2 or query_emb.shape[1] != self.dimension:
            raise ValueError(f"query embeddings must have shape [Q, {self.dimension}], got {query_emb.shape}")
        if topk < 1:
            raise ValueError(f"topk must be >= 1, got {topk}")
        k = min(topk, len(self))
        scores, ids = self.index.search(np.ascontiguousarray(query_emb, dtype=np.float32), k)
        return scores, ids

    def close(self) -> None:
        self.docs.close()


def _describe(m: dict[str, Any]) -> str:
    return (f"embedder {m.get('embedder')!r}, {m.get('count')} docs, type {m.get('index_type')!r}, "
            f"corpus sha256 {str(m.get('corpus_sha256'))[:12]}...")


def _chunk_path(chunk_dir: Path, k: int) -> Path:
    return chunk_dir / f"emb_{k:06d}.npy"


def _embed_chunks(docs: DocStore, emb: Embedder, chunk_dir: Path, chunk_size: int, n_chunks: int,
                  progress: bool, on_chunk_done: ChunkCallback | None) -> None:
    from tqdm import tqdm

    n_docs = len(docs)
    done = [k for k in range(n_chunks) if _chunk_path(chunk_dir, k).is_file()]
    bar = tqdm(total=n_docs, unit="doc", desc="embedding corpus", disable=not progress, dynamic_ncols=True)
    bar.update(sum(min(chunk_size, n_docs - k * chunk_size) for k in done))
    try:
        for k in range(n_chunks):
            path = _chunk_path(chunk_dir, k)
            if path.is_file():
                continue
            rows = range(k * chunk_size, min((k + 1) * chunk_size, n_docs))
            vectors = emb.embed_passages([docs.get(i)["contents"] for i in rows])
            tmp = chunk_dir / f".emb_{k:06d}.tmp.npy"
            np.save(tmp, vectors)
            os.replace(tmp, path)  # a chunk file exists only once complete
            bar.update(len(rows))
            if on_chunk_done is not None:
                on_chunk_done(k, n_chunks)
    finally:
        bar.close()


def _new_index(config: IndexConfig, dim: int, n_docs: int) -> Any:
    import faiss

    if config.index_type == "flat":
        return faiss.IndexFlatIP(dim)
    if config.index_type == "hnsw":
        index = faiss.IndexHNSWFlat(dim, config.hnsw_m, faiss.METRIC_INNER_PRODUCT)
        index.hnsw.efConstruction = config.ef_construction
        index.hnsw.efSearch = config.ef_search
        return index
    # faiss k-means wants >= 39 training points per cluster.
    nlist = config.nlist or max(1, min(int(4 * math.sqrt(n_docs)), n_docs // 39))
    if nlist > n_docs:
        raise ValueError(f"ivf index: nlist={nlist} exceeds the corpus size {n_docs}")
    if nlist * 39 > n_docs:
        warnings.warn(f"ivf index: nlist={nlist} leaves fewer than 39 training points per cluster "
                      f"({n_docs} docs)", stacklevel=3)
    quantizer = faiss.IndexFlatIP(dim)
    index = faiss.IndexIVFFlat(quantizer, dim, nlist, faiss.METRIC_INNER_PRODUCT)
    index.nprobe = config.nprobe
    # The quantizer must outlive this function together with the index.
    index.own_fields = True
    quantizer.this.disown()
    return index


def _training_sample(chunk_dir: Path, n_chunks: int, n_docs: int, limit: int) -> np.ndarray:
    """About `limit` vectors taken with an even stride over the whole corpus (deterministic, one chunk in memory)."""
    step = max(1, n_docs // limit)
    parts, offset = [], 0
    for k in range(n_chunks):
        chunk = np.load(_chunk_path(chunk_dir, k))
        first = (-offset) % step  # first row of this chunk whose global index is a multiple of step
        parts.append(chunk[first::step])
        offset += len(chunk)
    return np.ascontiguousarray(np.concatenate(parts))


def _atomic_write_text(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)
