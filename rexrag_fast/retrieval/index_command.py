"""`rexrag-fast index`: embed a Search-R1 corpus JSONL into a faiss index directory (resumable)."""

from __future__ import annotations

import argparse
import json
import sys

from rexrag_fast.retrieval.embedder import DEFAULT_EMBEDDER, EMBEDDER_DTYPES
from rexrag_fast.retrieval.index import INDEX_TYPES, IndexConfig, IndexMismatchError, build_index


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--corpus", required=True, help='corpus JSONL, rows {"id", "contents": "\\"Title\\"\\ntext"}')
    parser.add_argument("--out", required=True, help="index directory (re-run the same command to resume a build)")
    parser.add_argument("--embedder", default=DEFAULT_EMBEDDER,
                        help=f"sentence-transformers model name or directory (default {DEFAULT_EMBEDDER}, bundled)")
    parser.add_argument("--index-type", choices=INDEX_TYPES, default="flat", help="faiss index type (default flat)")
    parser.add_argument("--chunk-size", type=int, default=4096, help="rows embedded per saved chunk (default 4096)")
    parser.add_argument("--nlist", type=int, default=None, help="ivf: number of clusters (default 4*sqrt(N))")
    parser.add_argument("--nprobe", type=int, default=32, help="ivf: clusters searched per query")
    parser.add_argument("--hnsw-m", type=int, default=32, help="hnsw: links per node")
    parser.add_argument("--device", default=None, help="embedding device (default cuda when available)")
    parser.add_argument("--dtype", choices=EMBEDDER_DTYPES, default="auto",
                        help="embedding compute dtype (auto: fp16 on CUDA, bf16 on CPUs with native bf16, else fp32)")
    parser.add_argument("--keep-chunks", action="store_true", help="keep the per-chunk embeddings after the build")
    parser.add_argument("--overwrite", action="store_true", help="discard an existing index or partial build in --out")


def run(args: argparse.Namespace) -> int:
    from rexrag_fast.retrieval.embedder import get_embedder

    config = IndexConfig(index_type=args.index_type, nlist=args.nlist, nprobe=args.nprobe, hnsw_m=args.hnsw_m)
    try:
        embedder = get_embedder(args.embedder, args.device, args.dtype)
        manifest = build_index(args.corpus, args.out, embedder=embedder, config=config,
                               chunk_size=args.chunk_size, progress=True, keep_chunks=args.keep_chunks,
                               overwrite=args.overwrite)
    except (FileNotFoundError, ValueError, IndexMismatchError) as e:
        print(f"rexrag-fast index: {e}", file=sys.stderr)
        return 2
    print(json.dumps(manifest, indent=1))
    return 0
