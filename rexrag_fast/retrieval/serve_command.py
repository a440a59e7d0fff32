"""`rexrag-fast serve`: serve an index directory over HTTP with Search-R1's POST /retrieve API."""

from __future__ import annotations

import argparse
import sys

from rexrag_fast.retrieval.embedder import EMBEDDER_DTYPES
from rexrag_fast.retrieval.server import BatchingConfig, ServerLimits


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
    parser.add_argument("--default-topk", type=int, default=limits.default_topk)
    parser.add_argument("--max-topk", type=int, default=limits.max_topk)
    parser.add_argument("--max-queries", type=int, default=limits.max_queries, help="queries per request")
    parser.add_argument("--max-query-chars", type=int, default=limits.max_query_chars)
    parser.add_argument("--max-request-chars", type=int, default=limits.max_request_chars,
                        help="characters of all queries of one request")
    parser.add_argument("--max-body-bytes", type=int, default=limits.max_body_bytes)
    parser.add_argument("--max-pending-requests", type=int, default=limits.max_pending_requests,
                        help="requests in flight before new ones get 503 + Retry-After")
    parser.add_argument("--max-pending-queries", type=int, default=limits.max_pending_queries,
                        help="queries in flight before new requests get 503 + Retry-After")
    parser.add_argument("--max-connections", type=int, default=limits.max_connections,
                        help="open connections before new ones get 503 and are closed")
    parser.add_argument("--header-timeout", type=float, default=limits.header_timeout_s,
                        help="seconds a connection may take to send a request head (idle and slow clients)")
    parser.add_argument("--body-timeout", type=float, default=limits.body_timeout_s,
                        help="seconds a request body may take to arrive (408 past it)")
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
        limits = ServerLimits(max_queries=args.max_queries, max_topk=args.max_topk,
                              max_query_chars=args.max_query_chars, max_request_chars=args.max_request_chars,
                              max_body_bytes=args.max_body_bytes, default_topk=args.default_topk,
                              max_pending_requests=args.max_pending_requests,
                              max_pending_queries=args.max_pending_queries, max_connections=args.max_connections,
                              header_timeout_s=args.header_timeout, body_timeout_s=args.body_timeout)
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
