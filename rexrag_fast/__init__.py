"""rexrag-fast: a fast training engine for REX-RAG search agents (arXiv 2508.08149)."""

__version__ = "0.1.0"
