"""rexrag_fast.retrieval: corpus, embedder, faiss index, Search-R1-compatible HTTP server and client.

    r = LocalRetriever.from_index(index_dir)        # or LocalRetriever.for_world()
    client = RetrievalClient("http://127.0.0.1:8000/retrieve")
    results = r.retrieve(queries, topk=3)           # both: [Q] lists of {"document": {"id", "contents"}, "score"}
    text = format_passages(results[0])              # "Doc 1(Title: ...) text\\n..."
    r = build_retriever("world")                    # or a URL, a world directory, an index directory
"""

from rexrag_fast.retrieval.client import (
    RetrievalClient,
    RetrievalError,
    RetrievalRequestError,
    RetrievalUnavailableError,
)
from rexrag_fast.retrieval.embedder import DEFAULT_EMBEDDER, Embedder, get_embedder
from rexrag_fast.retrieval.format import format_passages, split_contents
from rexrag_fast.retrieval.index import DenseIndex, IndexConfig, IndexMismatchError, build_index, read_manifest
from rexrag_fast.retrieval.local import LocalRetriever
from rexrag_fast.retrieval.retriever import Retriever, RetrieverUnavailableError, build_retriever

__all__ = [
    "DEFAULT_EMBEDDER", "DenseIndex", "Embedder", "IndexConfig", "IndexMismatchError", "LocalRetriever",
    "RetrievalClient", "RetrievalError", "RetrievalRequestError", "RetrievalUnavailableError", "Retriever",
    "RetrieverUnavailableError", "build_index", "build_retriever", "format_passages", "get_embedder",
    "read_manifest", "split_contents",
]
