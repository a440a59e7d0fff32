"""The runner's own copy of a Qwen2 / Llama decoder's weights, fused for few matmuls, updated in place.

Per layer: wqkv = cat(q_proj, k_proj, v_proj) [(H + 2*KV) * D, hidden] (+ bias for Qwen2), wo [hidden, H*D],
w_gate_up = cat(gate_proj, up_proj) [2 * I, hidden], w_down [hidden, I], two RMSNorm weights. Rotary tables
come from the config's rope parameters: default, linear, llama3 or yarn (static ones); dynamic scalings are
refused because they change with the sequence length.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Mapping
from typing import Any

import torch

SUPPORTED_MODEL_TYPES = ("qwen2", "llama")


@dataclasses.dataclass(frozen=True)
class ModelShape:
    """What the forward needs to know of a transformers config."""

    model_type: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float
    max_position_embeddings: int
    tie_word_embeddings: bool
    attention_bias: bool
    mlp_bias: bool

    @classmethod
    def from_config(cls, config: Any) -> ModelShape:
        model_type = getattr(config, "model_type", None)
        if model_type not in SUPPORTED_MODEL_TYPES:
            raise ValueError(f"engine: model_type must be one of {SUPPORTED_MODEL_TYPES}, got {model_type!r}")
        if getattr(config, "hidden_act", "silu") != "silu":
            raise ValueError(f"engine: only hidden_act='silu' is supported, got {config.hidden_act!r}")
        if model_type == "qwen2" and getattr(config, "use_sliding_window", False):
            raise ValueError("engine: Qwen2 sliding-window attention is not supported (use_sliding_window=True)")
        heads = config.num_attention_heads
        kv_heads = getattr(config, "num_key_value_heads", None) or heads
        if heads % kv_heads:
            raise ValueError(f"engine: num_attention_heads {heads} is not a multiple of num_key_value_heads {kv_heads}")
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
        return cls(
            model_type=model_type,
            vocab_size=config.vocab_size,
            hidden_size=config.hidden_size,
            intermediate_size=config.intermediate_size,
            num_layers=config.num_hidden_layers,
            num_heads=heads,
            num_kv_heads=kv_heads,
            head_dim=head_dim,
            rms_norm_eps=float(config.rms_norm_eps),
            max_position_embeddings=config.max_position_embeddings,
            tie_word_embeddings=bool(getattr(config, "tie_word_embeddings", False)),
            attention_bias=model_type == "qwen2" or bool(getattr(config, "attention_bias", False)),
            mlp_bias=bool(getattr(config, "mlp_bias", False)),
        )


def rope_inv_freq(config: Any, head_dim: int) -> tuple[torch.Tensor, float]:
    """(inv_freq [head_dim/2] fp32, attention_scaling) of the config's rotary embedding.

    default: inv_freq_j = theta^(-2j / head_dim); other static types use transformers' own init functions.
    """
    params = getattr(config, "rope_parameters", None) or getattr(config, "rope_scaling", None) or {}
    rope_type = params.get("rope_type", params.get("type", "default"))
    theta = params.get("rope_theta", getattr(config, "rope_theta", 10000.0))
    if rope_type == "default":
        inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim))
        return inv_freq, 1.0
    if rope_type in ("linear", "llama3", "yarn"):
        from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

        inv_freq, scaling = ROPE_INIT_FUNCTIONS[rope_type](config, torch.device("cpu"))
        return inv_freq.float(), float(scaling)
    raise ValueError(
        f"engine: rope_type {rope_type!r} is not supported (default, linear, llama3, yarn are); "
        "dynamic scalings depend on the sequence length"
    )


class DecoderWeights:
    """Fused weight tensors of a decoder on `device` in `dtype`; `load` copies new values in place."""

    def __init__(self, config: Any, device: torch.device, dtype: torch.dtype) -> None:
        self.shape = s = ModelShape.from_config(config)
        self.device, self.dtype = device, dtype
        q, kv = s.num_heads * s.head_dim, s.num_kv_heads * s.head_dim
        new = lambda *shape: torch.empty(*shape, device=device, dtype=dtype)
        self.embed = new(s.vocab_size, s.hidden_size)
        self.lm_head = self.embed if s.tie_word_embeddings else new(s.vocab_size, s.hidden_size)
        self.final_norm = new(s.hidden_size)
        self.layers: list[dict[str, torch.Tensor | None]] = []
        for _ in range(s.num_layers):
            self.layers.append({
                "wqkv": new(q + 2 * kv, s.hidden_size),
                "bqkv": new(q + 2 * kv) if s.attention_bias else None,
                "wo": new(s.hidden_size, q),
                "bo": new(s.hidden_size) if s.attention_bias and s.model_type == "llama" else None,
                "w_gate_up": new(2 * s.intermediate_size, s.hidden_size),
                "b_gate_up": new(2 * s.intermediate_size) if s.mlp_bias else None,
                "w_down": new(s.hidden_size, s.intermediate_size),
                "b_down": new(s.hidden_size) if s.mlp_bias else None,
                "input_norm": new(s.hidden_size),
                "post_norm": new(s.hidden_size),
            })
        inv_freq, scaling = rope_inv_freq(config, s.head_dim)
        pos = torch.arange(s.max_position_embeddings, dtype=torch.float32)
        freqs = torch.outer(pos, inv_freq)  # [P, D/2], the same fp32 products transformers forms
        emb = torch.cat([freqs, freqs], dim=-1)
        self.cos = (emb.cos() * scaling).to(device=device, dtype=dtype)  # [P, D]
        self.sin = (emb.sin() * scaling).to(device=device, dtype=dtype)

    def _targets(self) -> dict[str, list[tuple[torch.Tensor, int, int]]]:
        """HF parameter name -> [(destination tensor, row start, row end)]."""
        s = self.shape
        q, kv, inter = s.num_heads * s.head_dim, s.num_kv_heads * s.head_dim, s.intermediate_size
        t: dict[str, list[tuple[torch.Tensor, int, int]]] = {
            "model.embed_tokens.weight": [(self.embed, 0, s.vocab_size)],
            "model.norm.weight": [(self.final_norm, 0, s.hidden_size)],
        }
        if not s.tie_word_embeddings:
            t["lm_head.weight"] = [(self.lm_head, 0, s.vocab_size)]
        for i, layer in enumerate(self.layers):
            p = f"model.layers.{i}."
            spans = {"q_proj": (0, q), "k_proj": (q, q + kv), "v_proj": (q + kv, q + 2 * kv)}
            for proj, (a, b) in spans.items():
                t[p + f"self_attn.{proj}.weight"] = [(layer["wqkv"], a, b)]
                if layer["bqkv"] is not None:
                    t[p + f"self_attn.{proj}.bias"] = [(layer["bqkv"], a, b)]
            t[p + "self_attn.o_proj.weight"] = [(layer["wo"], 0, s.hidden_size)]
            if layer["bo"] is not None:
                t[p + "self_attn.o_proj.bias"] = [(layer["bo"], 0, s.hidden_size)]
            for proj, (a, b) in {"gate_proj": (0, inter), "up_proj": (inter, 2 * inter)}.items():
                t[p + f"mlp.{proj}.weight"] = [(layer["w_gate_up"], a, b)]
                if layer["b_gate_up"] is not None:
                    t[p + f"mlp.{proj}.bias"] = [(layer["b_gate_up"], a, b)]
            t[p + "mlp.down_proj.weight"] = [(layer["w_down"], 0, s.hidden_size)]
            if layer["b_down"] is not None:
                t[p + "mlp.down_proj.bias"] = [(layer["b_down"], 0, s.hidden_size)]
            t[p + "input_layernorm.weight"] = [(layer["input_norm"], 0, s.hidden_size)]
            t[p + "post_attention_layernorm.weight"] = [(layer["post_norm"], 0, s.hidden_size)]
        return t

    @torch.no_grad()
    def load(self, weights: Mapping[str, torch.Tensor] | Iterable[tuple[str, torch.Tensor]]) -> None:
        """Copy transformers-named tensors (Qwen2ForCausalLM / LlamaForCausalLM names) in place.

        `weights`: a state dict, or an iterable of (name, tensor) pairs consumed one at a time (e.g. ZeRO-3
        parameters gathered one by one). Every expected tensor must come, with the expected shape; extra
        names (rotary buffers, a tied lm_head.weight) are ignored. A state dict is checked for missing names
        before anything is copied; a stream is checked at its end.
        """
        targets = self._targets()
        if isinstance(weights, Mapping):
            missing = [k for k in targets if k not in weights]
            if missing:
                raise KeyError(f"update_weights: state dict lacks {len(missing)} tensors, e.g. {missing[:3]}")
            weights = weights.items()
        seen: set[str] = set()
        for name, src in weights:
            dests = targets.get(name)
            if dests is None:
                continue
            for dst, a, b in dests:
                want = (b - a, *dst.shape[1:])
                if tuple(src.shape) != want:
                    raise ValueError(f"update_weights: {name} has shape {tuple(src.shape)}, expected {want}")
                dst[a:b].copy_(src)
            seen.add(name)
        missing = [k for k in targets if k not in seen]
        if missing:
            raise KeyError(f"update_weights: the weights lacked {len(missing)} tensors, e.g. {missing[:3]}")


def state_dict_of(weights: Any) -> Mapping[str, torch.Tensor] | Iterable[tuple[str, torch.Tensor]]:
    """What DecoderWeights.load takes, from a transformers model (any nn.Module), a state dict, or an
    iterable of (name, tensor) pairs (passed through)."""
    if isinstance(weights, torch.nn.Module):
        return weights.state_dict()
    if isinstance(weights, Mapping) or (isinstance(weights, Iterable) and not isinstance(weights, (str, bytes))):
        return weights
    raise TypeError(f"expected a transformers model, a state dict or (name, tensor) pairs, "
                    f"got {type(weights).__name__}")

