"""`rexrag-fast index`: embed a Search-R1 corpus JSONL into a faiss index directory (resumable), or wrap a faiss
index built elsewhere (--import-faiss, e.g. Search-R1's e5_Flat.index) without re-embedding."""

from __future__ import annotations

import argparse
import json
import sys

from rexrag_fast.retrieval.embedder import DEFAULT_EMBEDDER, EMBEDDER_DTYPES, POOLING_MODES
from rexrag_fast.retrieval.index import (
    INDEX_TYPES,
    IndexConfig,
    IndexMismatchError,
    build_index,
)
from rexrag_fast.retrieval.index_import import import_faiss_index


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--corpus", required=True, help='corpus JSONL, rows {"id", "contents": "\\"Title\\"\\ntext"}')
    parser.add_argument("--out", required=True, help="index directory (re-run the same command to resume a build)")
    parser.add_argument("--embedder", "--model", dest="embedder", default=DEFAULT_EMBEDDER,
                        help=f"sentence-transformers model name or directory (default {DEFAULT_EMBEDDER}, bundled)")
    parser.add_argument("--import-faiss", default=None, metavar="FAISS_FILE",
                        help="wrap this existing faiss index (row i = corpus row i, built with --model) instead of "
                             "embedding the corpus")
    parser.add_argument("--bm25", action="store_true",
                        help="build a sparse BM25 index instead (needs: pip install 'rexrag-fast[bm25]')")
    parser.add_argument("--pooling", choices=POOLING_MODES, default=None,
                        help="pooling of token states (default: mean for e5 models, else the model's own)")
    parser.add_argument("--query-prefix", default=None, help='text put before each query (default "query: " for e5)')
    parser.add_argument("--passage-prefix", default=None,
                        help='text put before each passage (default "passage: " for e5)')
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
        if args.bm25:
            from rexrag_fast.retrieval.bm25 import build_bm25_index

            print(json.dumps(build_bm25_index(args.corpus, args.out, progress=True, overwrite=args.overwrite),
                             indent=1))
            return 0
        embedder = get_embedder(args.embedder, args.device, args.dtype, pooling=args.pooling,
                                query_prefix=args.query_prefix, passage_prefix=args.passage_prefix)
        if args.import_faiss is not None:
            manifest = import_faiss_index(args.import_faiss, args.corpus, args.out, embedder=embedder,
                                          progress=True, overwrite=args.overwrite)
        else:
            manifest = build_index(args.corpus, args.out, embedder=embedder, config=config,
                                   chunk_size=args.chunk_size, progress=True, keep_chunks=args.keep_chunks,
                                   overwrite=args.overwrite)
    except (FileNotFoundError, ValueError, IndexMismatchError, ImportError) as e:
        print(f"rexrag-fast index: {e}", file=sys.stderr)
        return 2
    print(json.dumps(manifest, indent=1))
    return 0
