"""Dense faiss index over a corpus: chunked, resumable build with a manifest, and a checked loader.

Index directory layout:
    manifest.json     {"embedder", "embedder_dtype", "pooling", "query_prefix", "passage_prefix", "dimension",
                       "count", "corpus_sha256", "corpus_path", "corpus_bytes", "index_sha256", "index_bytes",
                       "spans_sha256", "spans_bytes", "index_type", "index_params", "metric": "inner_product",
                       "chunk_size", ...}; written last, so its presence means the build completed
    index.faiss       the faiss index (vectors are L2-normalised, so inner product = cosine similarity)
    doc_spans.npy     [N, 2] int64 byte spans of the corpus rows: row i of the index is document i
    build.json        settings of a build in progress (corpus checksum, embedder, chunk size, index config)
    chunks/emb_K.npy  embeddings of rows [K*chunk_size, (K+1)*chunk_size), written atomically

Bounded memory while embedding: one chunk of text and vectors at a time. A crashed build restarted with the same
arguments keeps its completed chunks and embeds only the rest; the result is the same index. Index types:
"flat" (exact, IndexFlatIP, what Search-R1 serves), "ivf" (IndexIVFFlat, nlist clusters, nprobe probed) and
"hnsw" (IndexHNSWFlat, graph with M links; its multi-threaded construction is not bit-reproducible).
A resume with a different embedder, compute dtype, pooling or prefix is refused, naming the field.

Integrity: the manifest records the sha256 and size of index.faiss, doc_spans.npy and the corpus. `DenseIndex.load`
always checks the sizes and that each file parses (cheap); `verify_index` re-hashes all three (what `serve` runs at
start-up), so a corpus edited in place, swapped span rows or an overwritten vector are refused, not served.
`index_import.import_faiss_index` wraps a faiss file built elsewhere (Search-R1's e5_Flat.index) in this layout.
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

from rexrag_fast.retrieval.corpus import DocStore, byte_progress, file_sha256, scan_corpus
from rexrag_fast.retrieval.embedder import DEFAULT_EMBEDDER, Embedder, get_embedder

# 2: checksums, embedder dtype, pooling and prefixes in the manifest.
INDEX_FORMAT_VERSION = 2
INDEX_TYPES = ("flat", "ivf", "hnsw")
MANIFEST_FILE = "manifest.json"
INDEX_FILE = "index.faiss"
SPANS_FILE = "doc_spans.npy"
BUILD_STATE_FILE = "build.json"
CHUNK_DIR = "chunks"


# Manifest keys that shape a build but not what the finished index means: a complete index is reused across them.
BUILD_ONLY_KEYS = ("chunk_size", "embedder_dtype")


class IndexMismatchError(ValueError):
    """An index directory does not match what the caller asked for (embedder, dimension, corpus)."""


class IndexIntegrityError(IndexMismatchError):
    """A file of an index directory is damaged or changed since the build (unreadable, wrong size or checksum)."""


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
    chunk_size), nothing is rebuilt. Progress bars (progress=True): corpus scan, embedding, faiss add, index write.
    Returns the manifest dict.
    """
    from tqdm import tqdm

    config = config or IndexConfig()
    config.validate()
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    corpus_path = Path(corpus_path).resolve()
    out = Path(out_dir)
    emb = embedder if isinstance(embedder, Embedder) else get_embedder(embedder)

    sha, spans = scan_corpus(corpus_path, progress=progress)
    n_docs = int(spans.shape[0])
    if n_docs == 0:
        raise ValueError(f"corpus {corpus_path} has no rows")
    wanted = {"format_version": INDEX_FORMAT_VERSION, "corpus_sha256": sha, "embedder": emb.name,
              "embedder_dtype": emb.dtype, "pooling": emb.pooling, "query_prefix": emb.query_prefix,
              "passage_prefix": emb.passage_prefix, "dimension": emb.dimension, "count": n_docs,
              "chunk_size": chunk_size, "index_type": config.index_type, "index_params": dataclasses.asdict(config)}

    manifest_path = out / MANIFEST_FILE
    if manifest_path.is_file() and not overwrite:
        existing = read_json_object(manifest_path)
        if existing.get("format_version") != INDEX_FORMAT_VERSION:
            warnings.warn(f"{out} holds an index in format {existing.get('format_version')!r}, this code writes "
                          f"{INDEX_FORMAT_VERSION} (checksums, embedding recipe): rebuilding it", stacklevel=2)
            overwrite = True
        elif all(existing.get(k) == v for k, v in wanted.items() if k not in BUILD_ONLY_KEYS):
            return existing
        else:
            raise IndexMismatchError(f"{out} already holds a different index ({_describe(existing)}); "
                                     "pass overwrite=True (--overwrite) or choose another output directory")
    state_path = out / BUILD_STATE_FILE
    if state_path.is_file() and not overwrite:
        state = read_json_object(state_path)
        if state != wanted:
            # Chunks embedded under other settings would be mixed into this index: name each difference.
            diff = "; ".join(f"{k}: partial build {state.get(k)!r}, now {wanted[k]!r}"
                             for k in wanted if state.get(k) != wanted[k])
            raise IndexMismatchError(f"{out} holds a partial build with different settings ({diff}); resume with "
                                     "the same settings, or pass overwrite=True (--overwrite) to discard it")
    if overwrite and out.exists():
        clear_index_dir(out)
    chunk_dir = out / CHUNK_DIR
    chunk_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_text(state_path, json.dumps(wanted, indent=1))

    n_chunks = math.ceil(n_docs / chunk_size)
    docs = DocStore(corpus_path, spans)
    try:
        _embed_chunks(docs, emb, chunk_dir, chunk_size, n_chunks, progress, on_chunk_done)
    finally:
        docs.close()

    index = _new_index(config, emb.dimension, n_docs)
    if config.index_type == "ivf":
        index.train(_training_sample(chunk_dir, n_chunks, n_docs, index.nlist * 64))
    with tqdm(total=n_docs, unit="vec", desc="faiss add", disable=not progress, dynamic_ncols=True) as bar:
        for k in range(n_chunks):
            vectors = np.load(_chunk_path(chunk_dir, k))
            index.add(vectors)
            bar.update(len(vectors))
    if index.ntotal != n_docs:
        raise RuntimeError(f"index holds {index.ntotal} vectors but the corpus has {n_docs} rows")

    manifest = {**wanted, "corpus_path": str(corpus_path), "corpus_bytes": corpus_path.stat().st_size,
                "metric": "inner_product", "normalized": True,
                **_write_faiss(index, out / INDEX_FILE, progress), **write_spans(spans, out / SPANS_FILE)}
    if config.index_type == "ivf":
        manifest["ivf_nlist"] = int(index.nlist)
    atomic_write_text(manifest_path, json.dumps(manifest, indent=1))
    state_path.unlink(missing_ok=True)
    if not keep_chunks:
        shutil.rmtree(chunk_dir, ignore_errors=True)
    return manifest


def read_manifest(index_dir: str | os.PathLike[str]) -> dict[str, Any]:
    """The manifest of a complete dense index directory (clear errors for an incomplete or foreign one)."""
    d = Path(index_dir)
    manifest = _read_complete_manifest(d)
    if manifest.get("retriever") == "bm25":
        raise IndexMismatchError(f"{d} is a BM25 index: load it with rexrag_fast.retrieval.bm25.BM25Retriever")
    if manifest.get("format_version") != INDEX_FORMAT_VERSION:
        raise IndexMismatchError(f"{d / MANIFEST_FILE}: format_version {manifest.get('format_version')!r}, this "
                                 f"code reads {INDEX_FORMAT_VERSION}; rebuild the index")
    return manifest


def verify_index(index_dir: str | os.PathLike[str], corpus_path: str | os.PathLike[str] | None = None,
                 progress: bool = True) -> None:
    """Re-hash the files of an index directory (dense: index.faiss, doc_spans.npy; BM25: its model files and
    doc_spans.npy) and the corpus (default: the manifest's corpus_path) against the manifest's sha256 and sizes.

    Raises IndexIntegrityError naming a file whose size or sha256 differs (FileNotFoundError for a missing one).
    Sizes are checked first (instant); then the files are hashed on one thread each (hashlib releases the GIL),
    so the time is that of the largest file at min(disk, sha256) speed: wiki-18's e5 flat index (21M x 768 fp32,
    65 GB) at ~0.5-2 GB/s per core takes about 0.5-2 minutes. progress: one tqdm bar per file, with ETA.
    """
    from concurrent.futures import ThreadPoolExecutor

    d = Path(index_dir)
    manifest = _read_complete_manifest(d)
    if manifest.get("retriever") != "bm25":
        manifest = read_manifest(d)
    corpus = locate_corpus(d, manifest, corpus_path)
    files = [(d / SPANS_FILE, manifest["spans_bytes"], manifest["spans_sha256"], "doc spans"),
             (corpus, manifest["corpus_bytes"], manifest["corpus_sha256"], "corpus")]
    if manifest.get("retriever") == "bm25":
        files += [(d / name, f["bytes"], f["sha256"], f"BM25 file {name}")
                  for name, f in manifest["model_files"].items()]
    else:
        files.append((d / INDEX_FILE, manifest["index_bytes"], manifest["index_sha256"], "faiss index"))
    check_file_sizes(d, [(path, size, what) for path, size, _, what in files])
    with ThreadPoolExecutor(len(files)) as pool:
        digests = list(pool.map(lambda i: file_sha256(files[i][0], progress, f"verifying {files[i][3]}", position=i),
                                range(len(files))))
    for (path, _, expected, what), got in zip(files, digests):
        if got != expected:
            raise IndexIntegrityError(f"{what} {path} has sha256 {got[:16]}..., the manifest records "
                                      f"{expected[:16]}...: it changed since the index was built. Rebuild the index "
                                      "(`rexrag-fast index ... --overwrite`); serving it would return wrong documents")


def _read_complete_manifest(d: Path) -> dict[str, Any]:
    path = d / MANIFEST_FILE
    if not path.is_file():
        hint = " (a build is in progress or crashed: run the same index command again to resume)" \
            if (d / BUILD_STATE_FILE).is_file() else ""
        raise FileNotFoundError(f"{d} is not a complete rexrag-fast index: {MANIFEST_FILE} is missing{hint}")
    return read_json_object(path)


class LoadedIndex:
    """An index directory in memory: its manifest, the corpus rows its ids point to, and where it lives."""

    def __init__(self, manifest: dict[str, Any], docs: DocStore, index_dir: Path) -> None:
        self.manifest = manifest
        self.docs = docs
        self.index_dir = index_dir

    def close(self) -> None:
        self.docs.close()


class DenseIndex(LoadedIndex):
    """A loaded dense index directory: the faiss index over the corpus rows."""

    def __init__(self, index: Any, manifest: dict[str, Any], docs: DocStore, index_dir: Path) -> None:
        super().__init__(manifest, docs, index_dir)
        self.index = index

    @classmethod
    def load(cls, index_dir: str | os.PathLike[str], embedder: str | None = None,
             corpus_path: str | os.PathLike[str] | None = None, verify_corpus: bool = False,
             use_gpu: bool | None = None) -> DenseIndex:
        """Load `index_dir`, refusing it if it was built with a different embedder than `embedder`.

        corpus_path: where the corpus lives now (default: the path recorded at build time). The sizes of the
        corpus, index.faiss and doc_spans.npy are checked against the manifest and unreadable files refused with
        IndexIntegrityError; verify_corpus=True also re-hashes the corpus (`verify_index` re-hashes all three).
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
        corpus = locate_corpus(d, manifest, corpus_path)
        _check_sizes(d, manifest, corpus)
        if verify_corpus and file_sha256(corpus) != manifest["corpus_sha256"]:
            raise IndexIntegrityError(f"index {d}: corpus {corpus} has another sha256 than the corpus the index "
                                      f"was built from ({manifest['corpus_sha256'][:16]}...); rebuild the index")
        index = read_faiss(d / INDEX_FILE)
        if index.ntotal != manifest["count"] or index.d != manifest["dimension"]:
            raise IndexIntegrityError(f"{d / INDEX_FILE} holds {index.ntotal} x {index.d} vectors, the manifest "
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
        spans = load_spans(d / SPANS_FILE, manifest["count"])
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



def _describe(m: dict[str, Any]) -> str:
    return (f"embedder {m.get('embedder')!r}, {m.get('count')} docs, type {m.get('index_type')!r}, "
            f"corpus sha256 {str(m.get('corpus_sha256'))[:12]}...")


def read_json_object(path: Path) -> dict[str, Any]:
    """A JSON object file of an index directory (IndexIntegrityError if it does not parse as one)."""
    try:
        data = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise IndexIntegrityError(f"{path} is not valid JSON ({e}): the index directory is damaged; rebuild it "
                                  "with `rexrag-fast index ... --overwrite`") from None
    if not isinstance(data, dict):
        raise IndexIntegrityError(f"{path} holds a JSON {type(data).__name__}, expected an object: the index "
                                  "directory is damaged; rebuild it with `rexrag-fast index ... --overwrite`")
    return data


def clear_index_dir(out: Path) -> None:
    for name in (MANIFEST_FILE, INDEX_FILE, SPANS_FILE, BUILD_STATE_FILE):
        (out / name).unlink(missing_ok=True)
    shutil.rmtree(out / CHUNK_DIR, ignore_errors=True)


def locate_corpus(d: Path, manifest: dict[str, Any], corpus_path: str | os.PathLike[str] | None) -> Path:
    """`corpus_path`, else the manifest's recorded corpus path; FileNotFoundError naming index `d` if absent."""
    corpus = Path(corpus_path) if corpus_path is not None else Path(manifest["corpus_path"])
    if not corpus.is_file():
        raise FileNotFoundError(f"index {d}: its corpus {corpus} is missing (pass corpus_path=/--corpus)")
    return corpus


def _check_sizes(d: Path, manifest: dict[str, Any], corpus: Path) -> None:
    """Sizes of the three files against the manifest: catches truncation and appends without reading the files."""
    check_file_sizes(d, [(d / INDEX_FILE, manifest["index_bytes"], "faiss index"),
                         (d / SPANS_FILE, manifest["spans_bytes"], "doc spans"),
                         (corpus, manifest["corpus_bytes"], "corpus")])


def check_file_sizes(d: Path, files: list[tuple[Path, int, str]]) -> None:
    """Raise FileNotFoundError / IndexIntegrityError unless each (path, expected bytes, what) has its size."""
    for path, expected, what in files:
        if not path.is_file():
            raise FileNotFoundError(f"index {d}: {what} {path} is missing; rebuild the index")
        if path.stat().st_size != expected:
            raise IndexIntegrityError(f"index {d}: {what} {path} has {path.stat().st_size} bytes, the index was "
                                      f"built with {expected} bytes (truncated or changed); rebuild the index")


def read_faiss(path: Path, flags: int = 0) -> Any:
    import faiss

    try:
        return faiss.read_index(str(path), flags)
    except RuntimeError as e:  # faiss reports a short or garbled file as a C++ exception
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise IndexIntegrityError(f"{path} is not a readable faiss index ({first}): truncated or damaged; "
                                  "rebuild the index") from None


def load_spans(path: Path, count: int) -> np.ndarray:
    """doc_spans.npy as a read-only memmap [count, 2] int64 (IndexIntegrityError if unreadable or misshapen)."""
    try:
        spans = np.load(path, mmap_mode="r")
    except (ValueError, OSError, EOFError) as e:
        raise IndexIntegrityError(f"{path} is not a readable .npy file ({e}): truncated or damaged; rebuild the "
                                  "index") from None
    if spans.shape != (count, 2) or spans.dtype != np.int64:
        raise IndexIntegrityError(f"{path} holds {spans.dtype} {tuple(spans.shape)}, expected int64 ({count}, 2); "
                                  "rebuild the index")
    return spans


def _write_faiss(index: Any, path: Path, progress: bool) -> dict[str, Any]:
    """Write `index` atomically to `path`, hashing the bytes as they go out -> {"index_sha256", "index_bytes"}."""
    import hashlib

    import faiss

    digest, tmp = hashlib.sha256(), path.with_name(path.name + ".tmp")
    # Vectors dominate the file (graph links and cluster ids come on top): the total, and so the ETA, is approximate.
    with open(tmp, "wb") as f, byte_progress(index.ntotal * index.d * 4, "writing index", progress) as bar:
        def write(block: bytes) -> None:
            f.write(block)
            digest.update(block)
            bar.update(len(block))

        faiss.write_index(index, faiss.PyCallbackIOWriter(write))
        bar.total = bar.n  # the estimate is over now: end the bar at 100%
    size = tmp.stat().st_size
    os.replace(tmp, path)
    return {"index_sha256": digest.hexdigest(), "index_bytes": size}


def write_spans(spans: np.ndarray, path: Path) -> dict[str, Any]:
    """Save spans [N, 2] int64 atomically -> {"spans_sha256", "spans_bytes"} for the manifest."""
    tmp = path.with_name(path.name + ".tmp.npy")
    np.save(tmp, np.ascontiguousarray(spans, dtype=np.int64))
    os.replace(tmp, path)
    return {"spans_sha256": file_sha256(path), "spans_bytes": path.stat().st_size}


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


def atomic_write_text(path: Path, text: str) -> None:
    """Write `text` to `path` through a temporary file, so `path` is either old or complete."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)
