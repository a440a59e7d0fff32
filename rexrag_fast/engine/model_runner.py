"""Forward of a Qwen2 / Llama decoder over the paged KV pool: varlen prefill and batched decode.

Per layer (pre-norm): h = x + o_proj(attn(rope(q), rope(k), v)), out = h + down(silu(gate(n)) * up(n)) with
n = rmsnorm(h); rmsnorm(x) = x / sqrt(mean(x^2) + eps) * w computed in fp32 as transformers does;
rope(x) = x * cos + rotate_half(x) * sin. Logits are computed only at the positions that sample.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

from rexrag_fast.engine import cpu_fused, cpu_linear
from rexrag_fast.engine.attention import AttentionMetadata, attend_cpp, choose_backend, paged_attention
from rexrag_fast.engine.kv_pool import KVPool
from rexrag_fast.engine.weights import DecoderWeights, state_dict_of


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """x [T, hidden] -> x / sqrt(mean(x^2) + eps) * weight, variance in fp32."""
    xf = x.float()
    xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return weight * xf.to(x.dtype)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x [T, heads, D], cos/sin [T, D]: x * cos + rotate_half(x) * sin with rotate_half(a, b) = (-b, a)."""
    half = x.shape[-1] // 2
    rotated = torch.cat([-x[..., half:], x[..., :half]], dim=-1)
    return x * cos.unsqueeze(1) + rotated * sin.unsqueeze(1)


PACKED = ("wqkv", "wo", "w_gate_up", "w_down")
BIAS_OF = {"wqkv": "bqkv", "wo": "bo", "w_gate_up": "b_gate_up", "w_down": "b_down"}  # a layer's bias keys


def linear_kind(device: torch.device, dtype: torch.dtype, weights: list[torch.Tensor]) -> str:
    """How the runner multiplies by its weights: "amx" (cpu_linear's AMX kernel for batches up to
    cpu_linear.MAX_ROWS rows, torch's matmul above; bf16 on CPUs with AMX-BF16, every weight of its shape),
    "onednn" (packed oneDNN, mkldnn_packing_helps) or "torch" (F.linear)."""
    if (device.type == "cpu" and dtype == torch.bfloat16 and cpu_linear.available()
            and all(cpu_linear.fits(w) for w in weights)):
        return "amx"
    return "onednn" if mkldnn_packing_helps(device, dtype) else "torch"


def mkldnn_packing_helps(device: torch.device, dtype: torch.dtype) -> bool:
    """CPU matmuls through oneDNN with weights pre-packed once (as inductor's freezing does), for fp32 and
    for bf16 where oneDNN has bf16 support. In an interleaved A/B at batch 16 on SmolLM2's shapes (2-core
    AMD EPYC, one thread) F.linear took 1.3-1.7x the packed time in bf16 (it reorders the weights every
    call) and 2-5x in fp32, 4.7x on the 49152 x 576 lm_head: torch's fp32 F.linear goes to MKL sgemm,
    whose small-batch path reads the weights at < 1 GB/s on this AMD CPU (the fp32 slowness of issue 14)."""
    if device.type != "cpu" or not torch.backends.mkldnn.is_available():
        return False
    if dtype == torch.bfloat16:
        return torch.ops.mkldnn._is_mkldnn_bf16_supported()
    return dtype == torch.float32


class ModelRunner:
    """Holds the weights and the KV pool; runs one batched forward per engine step."""

    def __init__(self, model_or_state_dict: Any, config: Any, *, num_blocks: int, block_size: int,
                 device: torch.device, dtype: torch.dtype, attention_backend: str = "auto") -> None:
        self.weights = DecoderWeights(config, device, dtype)
        self.weights.load(state_dict_of(model_or_state_dict))
        s = self.weights.shape
        self.shape = s
        self.device, self.dtype = device, dtype
        self.backend = choose_backend(attention_backend, device, block_size, dtype)
        self.kv = KVPool(s.num_layers, num_blocks, block_size, s.num_kv_heads, s.head_dim, dtype, device,
                         k_by_dim=self.backend == "cpp")
        self.linear_kind = linear_kind(device, dtype, [layer[k] for layer in self.weights.layers for k in PACKED]
                                       + [self.weights.lm_head])
        # C++ elementwise ops (cpu_fused) on the "cpp" backend: rope + K/V write (bit-identical to the torch ops)
        # always, the norms in bf16 only, where the fp32 sum of squares' order does not show (fp32 stays the
        # reference)
        self.fused_norm = self.backend == "cpp" and dtype == torch.bfloat16
        self._pack_weights()
        # "cpp" decode steps: KV blocks read per layer and KV head (K and V each), and reads saved by reading
        # shared prefix blocks once (bench/stages/rollout.py turns them into bytes per step)
        self.decode_steps = 0
        self.decode_kv_blocks_read = 0
        self.decode_kv_blocks_saved = 0

    def update_weights(self, model_or_state_dict: Any) -> None:
        """Copy new weight values in place (the KV pool is untouched)."""
        self.weights.load(state_dict_of(model_or_state_dict))
        self._pack_weights()

    def _pack_weights(self) -> None:
        """Packed copies of the matmul weights for the "amx" and "onednn" linear kinds, refreshed after every
        load."""
        # oneDNN-packed tensors, or cpu_linear.PackedLinear objects ("amx")
        self.packed: list[dict[str, Any]] | None = None
        self.packed_lm_head: Any = None
        if self.linear_kind == "torch":
            return
        if self.linear_kind == "amx":  # the bias goes with the packed weight
            self.packed = [{k: cpu_linear.PackedLinear(layer[k], layer[BIAS_OF[k]]) for k in PACKED}
                           for layer in self.weights.layers]
            self.packed_lm_head = cpu_linear.PackedLinear(self.weights.lm_head)
            return
        reorder = torch.ops.mkldnn._reorder_linear_weight
        self.packed = [{k: reorder(layer[k], None) for k in PACKED} for layer in self.weights.layers]
        self.packed_lm_head = reorder(self.weights.lm_head, None)

    def _linear(self, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                packed: torch.Tensor | None) -> torch.Tensor:
        """x [T, in] @ weight [out, in]^T + bias, through the packed copy when there is one."""
        if packed is None:
            return F.linear(x, weight, bias)
        if self.linear_kind == "amx":
            return F.linear(x, weight, bias) if x.shape[0] > cpu_linear.MAX_ROWS else packed(x)
        return torch.ops.mkldnn._linear_pointwise(x.contiguous(), packed, bias, "none", [], "")

    def _norm(self, x: torch.Tensor, delta: torch.Tensor | None, weight: torch.Tensor) -> torch.Tensor:
        """x += delta (in place; the residual add of the previous sublayer), then rms_norm(x) * weight."""
        if self.fused_norm:
            return cpu_fused.add_rms_norm(x, delta, weight, self.shape.rms_norm_eps)
        if delta is not None:
            x.add_(delta)
        return rms_norm(x, weight, self.shape.rms_norm_eps)

    def decode_forward(self, input_ids: torch.Tensor, positions: torch.Tensor, slot_mapping: torch.Tensor,
                       block_tables: torch.Tensor, context_lens: torch.Tensor) -> torch.Tensor:
        """One decode step as cuda_graphs.DecodeForward: input_ids, positions, slot_mapping [B],
        block_tables [B, max_blocks] int32, context_lens [B] int32 -> fp32 logits [B, vocab]. It reads no
        host-side values, so a CUDA graph can record it."""
        meta = AttentionMetadata(is_prefill=False, slot_mapping=slot_mapping, block_tables=block_tables,
                                 context_lens=context_lens)
        return self.forward(input_ids, positions, meta, torch.arange(input_ids.shape[0], device=input_ids.device))

    @torch.inference_mode()
    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, meta: AttentionMetadata,
                logits_index: torch.Tensor) -> torch.Tensor:
        """input_ids, positions [T] -> fp32 logits [len(logits_index), vocab] at rows logits_index of the batch."""
        w, s = self.weights, self.shape
        q_size, kv_size = s.num_heads * s.head_dim, s.num_kv_heads * s.head_dim
        cpp = self.backend == "cpp"
        if not cpp:
            cos, sin = w.cos[positions], w.sin[positions]
        x = w.embed[input_ids]
        delta = None  # the last sublayer's output, added to x by the next norm
        for i, layer in enumerate(w.layers):
            k_cache, v_cache = self.kv.layer(i)
            pk = self.packed[i] if self.packed is not None else dict.fromkeys(PACKED)
            h = self._norm(x, delta, layer["input_norm"])
            qkv = self._linear(h, layer["wqkv"], layer["bqkv"], pk["wqkv"])
            if cpp:  # rope, the K/V write and q's copy in one call
                q = cpu_fused.rope_write_kv(qkv, positions, w.cos, w.sin, meta.slot_mapping, k_cache, v_cache,
                                            s.num_heads)
                o = attend_cpp(q, k_cache, v_cache, meta)
            else:
                # q and k rotated in one pass (half the per-layer op launches of two calls; the same math)
                qk = apply_rope(qkv[:, :q_size + kv_size].view(-1, s.num_heads + s.num_kv_heads, s.head_dim),
                                cos, sin)
                q, k = qk[:, :s.num_heads], qk[:, s.num_heads:]
                v = qkv[:, q_size + kv_size:].reshape(-1, s.num_kv_heads, s.head_dim)
                o = paged_attention(self.backend, q, k, v, k_cache, v_cache, meta)
            delta = self._linear(o.reshape(-1, q_size), layer["wo"], layer["bo"], pk["wo"])
            h = self._norm(x, delta, layer["post_norm"])
            gate, up = self._linear(h, layer["w_gate_up"], layer["b_gate_up"], pk["w_gate_up"]).chunk(2, dim=-1)
            delta = self._linear(F.silu(gate) * up, layer["w_down"], layer["b_down"], pk["w_down"])
        x = x + delta
        if cpp and not meta.is_prefill:
            self.decode_steps += 1
            self.decode_kv_blocks_read += meta.cpu_plan.blocks_read
            private = sum(-(-c // self.kv.block_size) for c in meta.context_lens_list)
            self.decode_kv_blocks_saved += private - meta.cpu_plan.blocks_read
        x = rms_norm(x[logits_index], w.final_norm, s.rms_norm_eps)
        return self._linear(x, w.lm_head, None, self.packed_lm_head).float()
