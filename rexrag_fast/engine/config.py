"""Engine and sampling configuration: plain dataclasses validated on construction."""

from __future__ import annotations

import dataclasses

import torch

ATTENTION_BACKENDS = ("auto", "cpp", "flash_attn", "triton", "torch")


def check_top_k(top_k: object, name: str) -> None:
    """Raises ValueError, naming `name`, unless top_k is -1 (off) or a positive int."""
    if not isinstance(top_k, int) or (top_k < 1 and top_k != -1):
        raise ValueError(f"{name}: expected -1 (off) or a positive int, got {top_k!r}")


def check_top_p(top_p: float, name: str) -> None:
    """Raises ValueError, naming `name`, unless top_p is in (0, 1] (1 = off; NaN is refused)."""
    if not (0.0 < top_p <= 1.0):
        raise ValueError(f"{name}: expected a value in (0, 1], got {top_p!r}")


@dataclasses.dataclass(frozen=True)
class EngineConfig:
    """Sizes of the paged KV pool and the batching limits.

    num_blocks: KV blocks in the pool; each holds `block_size` tokens of every layer's K and V, so the pool
        tensor is [layers, 2, num_blocks, block_size, kv_heads, head_dim].
    max_num_batched_tokens: token budget of one forward (prefill chunks, or one token per running sequence
        in a decode step).
    max_num_seqs: most sequences running at once; the scheduler uses min(max_num_seqs, max_num_batched_tokens)
        so that a decode step stays within the token budget.
    dtype / device: of the weights and the KV pool; dtype None -> the model's dtype on CPU, bfloat16 on CUDA;
        "auto" -> bfloat16 on CUDA and on CPUs with native bf16 arithmetic (AVX-512-BF16 or AMX), float32 on
        other CPUs (where bf16 matmuls are emulated and slower than fp32). device None -> the model's device.
        Log-probs handed back are fp32 whatever the dtype.
    enable_prefix_caching: reuse KV of cached prefixes on admission and keep finished sequences' blocks.
    attention_backend: "auto" (the C++ paged kernel on the CPU; on CUDA flash-attn when importable, else the
        Triton decode kernel, else PyTorch), "cpp", "flash_attn", "triton" or "torch" (the reference path).
    cuda_graphs: decode steps replay one CUDA graph per batch-size bucket (engine/cuda_graphs.py); None (the
        default) = on when the engine runs on CUDA. One KV block is then reserved as the padding rows'
        scratch slot. True on a CPU runs the same padded decode path without graphs (what tests exercise);
        not with the "cpp" backend, whose plans refuse the padding rows' empty contexts.
    cpu_keep_freed_memory: on a CPU engine under glibc, memory freed between steps stays mapped for the next
        step instead of going back to the kernel (engine/host_memory.py: a prefill's changing activation sizes
        otherwise fault every page in again). Process-wide; resident memory stays at its high-water mark.
    """

    num_blocks: int = 512
    block_size: int = 16
    max_num_batched_tokens: int = 4096
    max_num_seqs: int = 64
    dtype: torch.dtype | str | None = None
    device: torch.device | str | None = None
    enable_prefix_caching: bool = True
    attention_backend: str = "auto"
    cuda_graphs: bool | None = None
    cpu_keep_freed_memory: bool = True

    def __post_init__(self) -> None:
        for name in ("num_blocks", "block_size", "max_num_batched_tokens", "max_num_seqs"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"EngineConfig.{name}: expected a positive int, got {value!r}")
        if isinstance(self.dtype, str) and self.dtype != "auto":
            raise ValueError(f"EngineConfig.dtype: expected a torch dtype, None or 'auto', got {self.dtype!r}")
        if self.cuda_graphs not in (None, True, False):
            raise ValueError(f"EngineConfig.cuda_graphs: expected None, True or False, got {self.cuda_graphs!r}")
        if not isinstance(self.cpu_keep_freed_memory, bool):
            raise ValueError(f"EngineConfig.cpu_keep_freed_memory: expected True or False, got "
                             f"{self.cpu_keep_freed_memory!r}")
        if self.cuda_graphs and self.num_blocks < 2:
            raise ValueError(f"EngineConfig.num_blocks: cuda_graphs reserve one block, so at least 2 are needed, "
                             f"got {self.num_blocks}")
        if self.attention_backend not in ATTENTION_BACKENDS:
            raise ValueError(
                f"EngineConfig.attention_backend: expected one of {ATTENTION_BACKENDS}, got {self.attention_backend!r}"
            )


def cpu_has_native_bf16() -> bool:
    """True when the CPU does bf16 dot products in hardware (x86 flags avx512_bf16 or amx_bf16; Linux)."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    flags = line.split(":", 1)[1].split()
                    return "avx512_bf16" in flags or "amx_bf16" in flags
    except OSError:
        pass
    return False


def resolve_dtype(requested: torch.dtype | str | None, device: torch.device,
                  model_dtype: torch.dtype) -> torch.dtype:
    """The engine's dtype for EngineConfig.dtype `requested` (see there) on `device`."""
    if requested == "auto":
        if device.type == "cpu":
            return torch.bfloat16 if cpu_has_native_bf16() else torch.float32
        return torch.bfloat16
    if requested is None:
        return model_dtype if device.type == "cpu" else torch.bfloat16
    return requested


@dataclasses.dataclass(frozen=True)
class SamplingParams:
    """How one request samples and when it stops.

    temperature 0 -> greedy (argmax). top_k -1 -> no top-k; top_p 1.0 -> no nucleus truncation.
    stop_token_ids end the sequence with finish_reason "stop" (EOS gives "eos"); `stop` strings are checked
    on the decoded tail after each token and are kept in the output. seed None -> drawn from the engine's
    generator; a given seed makes the request's samples independent of the batch it runs in.
    """

    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = -1
    max_tokens: int = 64
    stop_token_ids: tuple[int, ...] = ()
    stop: tuple[str, ...] = ("</search>", "</answer>")
    seed: int | None = None
    ignore_eos: bool = False

    def __post_init__(self) -> None:
        if not (self.temperature >= 0.0):
            raise ValueError(f"SamplingParams.temperature: expected >= 0 (0 = greedy), got {self.temperature!r}")
        check_top_p(self.top_p, "SamplingParams.top_p")
        check_top_k(self.top_k, "SamplingParams.top_k")
        if not isinstance(self.max_tokens, int) or self.max_tokens < 1:
            raise ValueError(f"SamplingParams.max_tokens: expected a positive int, got {self.max_tokens!r}")
        if isinstance(self.stop, str):
            object.__setattr__(self, "stop", (self.stop,))
        object.__setattr__(self, "stop", tuple(self.stop))
        object.__setattr__(self, "stop_token_ids", tuple(int(t) for t in self.stop_token_ids))
        if any(not isinstance(s, str) or not s for s in self.stop):
            raise ValueError(f"SamplingParams.stop: expected non-empty strings, got {self.stop!r}")
        if any(t < 0 for t in self.stop_token_ids):
            raise ValueError(f"SamplingParams.stop_token_ids: expected token ids >= 0, got {self.stop_token_ids}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0
