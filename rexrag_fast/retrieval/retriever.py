"""What the agent loop searches with (`Retriever`), and the one way to build one from a spec string.

A spec is what a user writes on a command line or in a config:

    http://host:8000/retrieve   a retrieval server (ours or Search-R1's), checked with one query first
    world                       the embedded world's in-process retriever (built on first use)
    DIR with corpus.jsonl and world.json    a world directory
    DIR with an index manifest  an index built or imported by `rexrag-fast index` (dense faiss or BM25)
"""

from __future__ import annotations

from pathlib import Path
from typing import Protocol

WORLD = "world"


class Retriever(Protocol):
    def retrieve(self, queries: list[str], topk: int = 3, return_scores: bool = True) -> list[list[dict]]:
        """[Q] lists of up to `topk` {"document": {"id", "contents"}, "score"} for each query."""
        ...


class RetrieverUnavailableError(RuntimeError):
    """The configured retrieval server did not answer a one-query probe."""


def check_retriever(url: str, timeout_s: float) -> None:
    """Send one query to the retrieval server at `url`; raise RetrieverUnavailableError at once if it fails.

    One retry at most and a timeout of min(timeout_s, 10) s: a training run must not start (and spend
    minutes loading a model) against a server that is not there."""
    from rexrag_fast.retrieval.client import RetrievalClient, RetrievalError

    try:
        with RetrievalClient(url, timeout=min(timeout_s, 10.0), retries=1, backoff=0.2) as client:
            client.retrieve(["connectivity check"], topk=1)
    except (RetrievalError, ValueError) as e:
        raise RetrieverUnavailableError(
            f"retriever.url = {url} is unreachable: {e}\nStart a server (`rexrag-fast serve --index DIR`), "
            "fix retriever.url, or set retriever.embedded=true for the embedded world's in-process retriever."
        ) from None


def build_retriever(spec: str | Path, *, timeout_s: float = 10.0, check: bool = True, key: str = "retriever"
                    ) -> Retriever:
    """The retriever that `spec` names (see the module docstring). A URL is probed first when `check`;
    `key` names the setting in error messages."""
    from rexrag_fast.retrieval.client import RetrievalClient
    from rexrag_fast.retrieval.local import LocalRetriever, load_retriever

    spec = str(spec)
    if spec.startswith(("http://", "https://")):
        if check:
            check_retriever(spec, timeout_s)
        return RetrievalClient(spec, timeout=timeout_s)
    if spec == WORLD:
        return LocalRetriever.for_world()
    path = Path(spec)
    if (path / "corpus.jsonl").is_file() and (path / "world.json").is_file():
        return LocalRetriever.for_world(path)
    if path.is_dir():
        return load_retriever(path)
    raise ValueError(f"{key} must be an http(s) URL, {WORLD!r}, a world directory or an index directory; "
                     f"got {spec!r}")
