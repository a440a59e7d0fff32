"""In-process retriever: the server's search without HTTP, for tests and single-machine runs.

`LocalRetriever.retrieve` returns exactly what `RetrievalClient.retrieve` returns from a server, so agent code
takes either.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from rexrag_fast.retrieval.embedder import DEFAULT_EMBEDDER, Embedder, get_embedder
from rexrag_fast.retrieval.index import (
    MANIFEST_FILE,
    DenseIndex,
    IndexConfig,
    IndexMismatchError,
    build_index,
    read_json_object,
    verify_index,
)


def check_queries(queries: Any, topk: Any) -> None:
    """Raise TypeError/ValueError naming the bad argument unless queries is a list of str and topk an int >= 1."""
    if not isinstance(queries, list) or not all(isinstance(q, str) for q in queries):
        raise TypeError(f"queries must be a list of str, got {type(queries).__name__}"
                        + ("" if not isinstance(queries, list) else " with non-str items"))
    if isinstance(topk, bool) or not isinstance(topk, int) or topk < 1:
        raise ValueError(f"topk must be an int >= 1, got {topk!r}")


class LocalRetriever:
    """Dense retrieval in this process: embed queries, search the faiss index, fetch the rows."""

    def __init__(self, index: DenseIndex, embedder: Embedder) -> None:
        if embedder.name != index.manifest["embedder"]:
            raise IndexMismatchError(f"index {index.index_dir} was built with embedder "
                                     f"{index.manifest['embedder']!r}, got an embedder {embedder.name!r}")
        for field in ("pooling", "query_prefix", "passage_prefix"):
            if getattr(embedder, field) != index.manifest[field]:
                raise IndexMismatchError(f"index {index.index_dir} was embedded with {field} "
                                         f"{index.manifest[field]!r}, the query embedder uses "
                                         f"{getattr(embedder, field)!r}: queries must be embedded as the passages were")
        if embedder.dimension != index.dimension:
            raise IndexMismatchError(f"embedder {embedder.name!r} gives {embedder.dimension}-d vectors, index "
                                     f"{index.index_dir} holds {index.dimension}-d vectors")
        self.index = index
        self.embedder = embedder

    @classmethod
    def from_index(cls, index_dir: str | os.PathLike[str], embedder: str | Embedder | None = None,
                   corpus_path: str | os.PathLike[str] | None = None, device: str | None = None,
                   dtype: str = "auto") -> LocalRetriever:
        """Load an index directory; `embedder` (default: the manifest's) must match the one it was built with.

        A named embedder is loaded with the pooling and prefixes the manifest records (those of an imported index).
        """
        name = embedder.name if isinstance(embedder, Embedder) else embedder
        index = DenseIndex.load(index_dir, embedder=name, corpus_path=corpus_path)
        if not isinstance(embedder, Embedder):
            m = index.manifest
            embedder = get_embedder(m["embedder"], device, dtype, pooling=m["pooling"],
                                    query_prefix=m["query_prefix"], passage_prefix=m["passage_prefix"])
        return cls(index, embedder)

    @classmethod
    def for_world(cls, world_dir: str | os.PathLike[str] | None = None, embedder: str = DEFAULT_EMBEDDER,
                  progress: bool = False) -> LocalRetriever:
        """A retriever over an embedded world's corpus (default: default_world_dir()).

        The flat index is built on first use into <world_dir>/index-<embedder> and reused afterwards.
        """
        from rexrag_fast.data.world import default_world_dir

        wdir = Path(world_dir) if world_dir is not None else default_world_dir()
        index_dir = wdir / f"index-{Path(embedder.rstrip('/')).name}"
        build_index(wdir / "corpus.jsonl", index_dir, embedder=get_embedder(embedder), config=IndexConfig("flat"),
                    progress=progress)
        return cls.from_index(index_dir, embedder=embedder)

    def __len__(self) -> int:
        return len(self.index)

    def retrieve(self, queries: list[str], topk: int = 3, return_scores: bool = True) -> list[list[dict[str, Any]]]:
        """[Q] queries -> per query, the top-k documents best first (k = min(topk, corpus size)).

        return_scores=True: [{"document": {"id", "contents"}, "score": float}, ...] (inner product of unit
        vectors); False: [{"id", "contents"}, ...], Search-R1's shape without scores.
        """
        check_queries(queries, topk)
        if not queries:
            return []
        scores, ids = self.index.search(self.embedder.embed_queries(queries), topk)
        out: list[list[dict[str, Any]]] = []
        for row_scores, row_ids in zip(scores.tolist(), ids.tolist()):
            hits = [(self.index.docs.get(i), s) for i, s in zip(row_ids, row_scores) if i >= 0]
            out.append([{"document": d, "score": s} for d, s in hits] if return_scores else [d for d, _ in hits])
        return out


def load_retriever(index_dir: str | os.PathLike[str], corpus_path: str | os.PathLike[str] | None = None,
                   device: str | None = None, dtype: str = "auto", verify: bool = False) -> Any:
    """The in-process retriever of any index directory: a BM25Retriever for a BM25 index (`rexrag-fast index
    --bm25`, needs bm25s), else a LocalRetriever (built or imported faiss index, queries embedded with the
    manifest's recipe). verify=True first re-hashes the index files and corpus (`verify_index`). Both answer
    `retrieve(queries [Q], topk, return_scores)` as `RetrievalClient` does."""
    d = Path(index_dir)
    if verify:
        verify_index(d, corpus_path=corpus_path)
    manifest_path = d / MANIFEST_FILE
    if manifest_path.is_file() and read_json_object(manifest_path).get("retriever") == "bm25":
        from rexrag_fast.retrieval.bm25 import BM25Retriever

        return BM25Retriever.from_index(d, corpus_path=corpus_path)
    return LocalRetriever.from_index(d, corpus_path=corpus_path, device=device, dtype=dtype)
