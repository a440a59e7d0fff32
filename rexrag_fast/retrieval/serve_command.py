"""`rexrag-fast serve`: serve an index directory over HTTP with Search-R1's POST /retrieve API."""

from __future__ import annotations

import argparse
import sys

from rexrag_fast.retrieval.batcher import BatchingConfig
from rexrag_fast.retrieval.embedder import EMBEDDER_DTYPES
from rexrag_fast.retrieval.server import ServerLimits

# --flag -> ServerLimits field, with its help where the name does not say it all.
LIMIT_FLAGS = (
    ("--default-topk", "default_topk", ""),
    ("--max-topk", "max_topk", ""),
    ("--max-queries", "max_queries", "queries per request"),
    ("--max-query-chars", "max_query_chars", ""),
    ("--max-request-chars", "max_request_chars", "characters of all queries of one request"),
    ("--max-body-bytes", "max_body_bytes", ""),
    ("--max-pending-requests", "max_pending_requests", "requests in flight before new ones get 503 + Retry-After"),
    ("--max-pending-queries", "max_pending_queries", "queries in flight before new requests get 503 + Retry-After"),
    ("--max-connections", "max_connections", "open connections before new ones get 503 and are closed"),
    ("--header-timeout", "header_timeout_s", "seconds a connection may take to send a request head (idle and "
                                             "slow clients)"),
    ("--body-timeout", "body_timeout_s", "seconds a request body may take to arrive (408 past it)"),
)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    limits, batching = ServerLimits(), BatchingConfig()
    parser.add_argument("--index", required=True, help="index directory written by `rexrag-fast index`")
    parser.add_argument("--port", type=int, default=8000, help="TCP port (default 8000, as Search-R1)")
    parser.add_argument("--host", default="127.0.0.1",
                        help="bind address (default 127.0.0.1: this machine only; 0.0.0.0 to serve trainers on "
                             "other nodes of a cluster, on a trusted network: there is no authentication)")
    parser.add_argument("--corpus", default=None, help="corpus JSONL if it moved since the index was built")
    parser.add_argument("--embedder", default=None, help="refuse to start unless the index was built with this")
    parser.add_argument("--device", default=None, help="query embedding device (default cuda when available)")
    parser.add_argument("--dtype", choices=EMBEDDER_DTYPES, default="auto",
                        help="embedding compute dtype (auto: fp16 on CUDA, bf16 on CPUs with native bf16, else fp32)")
    for flag, field, text in LIMIT_FLAGS:
        default = getattr(limits, field)
        parser.add_argument(flag, dest=field, type=type(default), default=default, help=text or None)
    parser.add_argument("--max-batch-queries", type=int, default=batching.max_batch_queries,
                        help="queries merged into one embedding call")
    parser.add_argument("--max-wait-ms", type=float, default=batching.max_wait_ms,
                        help="how long the batcher waits for more requests")
    parser.add_argument("--no-batching", action="store_true", help="embed each request on its own")
    parser.add_argument("--no-verify", action="store_true",
                        help="skip re-hashing index.faiss, doc_spans.npy and the corpus at start-up (minutes for "
                             "wiki-18); file sizes are still checked, edits that keep sizes go unnoticed")


def run(args: argparse.Namespace) -> int:
    from rexrag_fast.retrieval.index import IndexMismatchError, verify_index
    from rexrag_fast.retrieval.server import serve

    try:
        limits = ServerLimits(**{field: getattr(args, field) for _, field, _ in LIMIT_FLAGS})
    except ValueError as e:
        print(f"rexrag-fast serve: {e}", file=sys.stderr)
        return 2
    batching = BatchingConfig(enabled=not args.no_batching, max_batch_queries=args.max_batch_queries,
                              max_wait_ms=args.max_wait_ms)
    try:
        if args.no_verify:
            print("rexrag-fast serve: --no-verify: not re-hashing index.faiss, doc_spans.npy and the corpus; only "
                  "their sizes are checked", file=sys.stderr)
        else:
            verify_index(args.index, corpus_path=args.corpus)
        serve(args.index, host=args.host, port=args.port, limits=limits, batching=batching, embedder=args.embedder,
              corpus_path=args.corpus, device=args.device, dtype=args.dtype)
    except (FileNotFoundError, IndexMismatchError) as e:
        print(f"rexrag-fast serve: {e}", file=sys.stderr)
        return 2
    return 0
