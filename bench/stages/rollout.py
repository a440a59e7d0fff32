"""Benchmark stage `rollout`: the paged-KV engine vs transformers generate, and the REX-RAG probe phase.

(a) Batched greedy generation, tokens generated per second: LLMEngine (prefix caching off, so no reuse
    helps it) vs transformers `generate` on the same left-padded batch, on a tiny random Qwen2 and on the
    real SmolLM2-135M-Instruct (preset tiny, CPU), or Qwen2.5-3B-shaped random weights (GPU preset).
(b) Probe phase: N dead-end trajectories are generated, then each is forked at its last few tokens with a
    20-token exploratory prompt and continued. With the prefix cache the shared prefix's full blocks are
    reused; the baseline is the same engine with prefix caching off, which re-prefills every prefix. Rows:
    probe tokens generated per second (both), and the fraction of shared-prefix prefill avoided.

SmolLM2 in (a) costs ~30-40 s of GGUF loading on a busy CPU, more than this stage's share of the whole
benchmark, so it runs only with REXRAG_BENCH_SMOLLM2=1.
"""

from __future__ import annotations

import os
import time

import torch

from bench.harness import Progress, Row, stage
from rexrag_fast.engine import EngineConfig, LLMEngine, Request, SamplingParams
from rexrag_fast.engine.models import load_smollm2, tiny_model

QWEN25_3B = dict(hidden_size=2048, intermediate_size=11008, num_hidden_layers=36, num_attention_heads=16,
                 num_key_value_heads=2, max_position_embeddings=32768, tie_word_embeddings=True)
SIZES = {
    # (a) prompts, prompt length range, new tokens; (b) trajectories, prefix length, probe new tokens
    "tiny": dict(gen_prompts=16, gen_len=(32, 96), gen_new=48, probes=16, prefix=960, probe_new=16,
                 smollm2=dict(prompts=4, len=(16, 32), new=12), vocab=8192, block=16),
    "qwen2.5-3b": dict(gen_prompts=64, gen_len=(128, 512), gen_new=256, probes=64, prefix=2048, probe_new=64,
                       smollm2=None, vocab=151936, block=256),
}
EXPLORE_LEN = 20


def _prompts(n: int, lo: int, hi: int, vocab: int, seed: int) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(lo, hi + 1, (n,), generator=g).tolist()
    return [torch.randint(3, vocab, (k,), generator=g).tolist() for k in lengths]


def _greedy(n: int) -> SamplingParams:
    return SamplingParams(temperature=0.0, max_tokens=n, stop=(), ignore_eos=True)


def _hf_generate(model, prompts: list[list[int]], new_tokens: int) -> None:
    width = max(map(len, prompts))
    ids = torch.zeros(len(prompts), width, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, p in enumerate(prompts):  # left padding, as generation needs
        ids[i, width - len(p):] = torch.tensor(p)
        mask[i, width - len(p):] = 1
    with torch.no_grad():
        model.generate(ids.to(model.device), attention_mask=mask.to(model.device), max_new_tokens=new_tokens,
                       min_new_tokens=new_tokens, do_sample=False, eos_token_id=None, pad_token_id=0)


def _timed(fn, sync) -> float:
    t = time.perf_counter()
    fn()
    if sync:
        sync()
    return time.perf_counter() - t


def _generation_rows(name: str, model, prompts, new_tokens: int, block: int, config: str, sync,
                     progress: Progress) -> list[Row]:
    blocks = len(prompts) * (-(-(max(map(len, prompts)) + new_tokens) // block)) + 8
    engine = LLMEngine(model, config=EngineConfig(num_blocks=blocks, block_size=block, enable_prefix_caching=False,
                                                  max_num_seqs=len(prompts)))
    reqs = [Request(p, _greedy(new_tokens)) for p in prompts]
    generated = len(prompts) * new_tokens
    progress(f"{name}: engine warm-up")
    engine.generate(reqs[:2])
    engine_s = min(_timed(lambda: engine.generate(reqs), sync) for _ in range(2))
    progress(f"{name}: transformers generate")
    _hf_generate(model, prompts[:2], 2)
    hf_s = _timed(lambda: _hf_generate(model, prompts, new_tokens), sync)
    return [Row("rollout", f"generate {name}", generated / engine_s, "tokens/s", generated / hf_s,
                "transformers generate", config, {"engine_s": engine_s, "transformers_s": hf_s})]


def _probe_rows(model, s: dict, config: str, sync, progress: Progress) -> list[Row]:
    n, block = s["probes"], s["block"]
    vocab = model.config.vocab_size
    prompts = _prompts(n, s["prefix"], s["prefix"], vocab, seed=1)
    dead_new = 32
    per_seq = -(-(s["prefix"] + dead_new + EXPLORE_LEN + s["probe_new"]) // block)
    cfg = dict(num_blocks=2 * n * per_seq + 8, block_size=block, max_num_seqs=n,
               max_num_batched_tokens=max(4096, s["prefix"] + 512))
    cached = LLMEngine(model, config=EngineConfig(**cfg))
    plain = LLMEngine(model, config=EngineConfig(**cfg, enable_prefix_caching=False))
    explore = _prompts(n, EXPLORE_LEN, EXPLORE_LEN, vocab, seed=2)
    results = {}
    for label, engine in (("prefix cache", cached), ("re-prefill", plain)):
        times = []
        for rep in range(3):  # rep 0 warms up
            engine.reset_prefix_cache()
            dead_ends = engine.generate([Request(p, _greedy(dead_new)) for p in prompts])
            # fork each dead end before its last 8 tokens (where the wrong answer began) + exploratory prompt
            probes = [engine.fork(d, len(d.token_ids) - 8, e, _greedy(s["probe_new"]))
                      for d, e in zip(dead_ends, explore)]
            engine.reset_counters()
            progress(f"probe phase ({label}) run {rep}")
            seconds = _timed(lambda probes=probes, engine=engine: engine.generate(probes), sync)
            if rep:
                times.append(seconds)
        c = engine.counters
        shared = sum(len(p.prompt_token_ids) - EXPLORE_LEN for p in probes)
        results[label] = dict(seconds=min(times), prefill=c.prefill_tokens, cached=c.cached_tokens, shared=shared)
    generated = n * s["probe_new"]
    a, b = results["prefix cache"], results["re-prefill"]
    progress(f"probe prefill tokens computed: {a['prefill']} with the prefix cache ({a['cached']} reused) vs "
             f"{b['prefill']} re-prefilling; {a['seconds']:.3f}s vs {b['seconds']:.3f}s")
    extra = {"prefill_tokens_cached_engine": a["prefill"], "prefill_tokens_reprefill": b["prefill"],
             "cached_tokens": a["cached"], "shared_prefix_tokens": a["shared"],
             "cached_s": a["seconds"], "reprefill_s": b["seconds"]}
    return [
        Row("rollout", "probe phase", generated / a["seconds"], "tokens/s", generated / b["seconds"],
            "re-prefill whole prefix (no cache)", config, extra),
        Row("rollout", "probe shared-prefix prefill avoided", a["cached"] / a["shared"], "fraction", None, "",
            config, extra),
    ]


@stage("rollout")
def run(preset: str, progress: Progress) -> list[Row]:
    cuda = preset != "tiny" and torch.cuda.is_available()
    s = SIZES[preset]
    sync = torch.cuda.synchronize if cuda else None
    card = torch.cuda.get_device_name(0) if cuda else "CPU, 1 thread"
    threads = torch.get_num_threads()
    if not cuda:
        torch.set_num_threads(1)  # tiny matmuls: one thread beats contended OpenMP; both sides run alike
    rows: list[Row] = []
    try:
        if cuda:
            with torch.device("cuda"):
                model = tiny_model("qwen2", vocab_size=s["vocab"], seed=0, **QWEN25_3B).to(torch.bfloat16)
            name, dtype = "qwen2.5-3b random", "bf16"
        else:
            model = tiny_model("qwen2", vocab_size=s["vocab"], seed=0)
            name, dtype = "tiny qwen2", "fp32"
        nparams = sum(p.numel() for p in model.parameters())
        lo, hi = s["gen_len"]
        prompts = _prompts(s["gen_prompts"], lo, hi, s["vocab"], seed=0)
        config = (f"{name} ({nparams / 1e6:.1f}M params, {dtype}), {len(prompts)} prompts of {lo}-{hi} tokens, "
                  f"{s['gen_new']} new, greedy, block {s['block']}, {card}")
        rows += _generation_rows(name, model, prompts, s["gen_new"], s["block"], config, sync, progress)
        probe_config = (f"{name}, {s['probes']} dead ends of {s['prefix']}+32 tokens, fork at -8, "
                        f"+{EXPLORE_LEN} explore tokens, {s['probe_new']} new, greedy, block {s['block']}, {card}")
        rows += _probe_rows(model, s, probe_config, sync, progress)
        if s["smollm2"] is not None and os.environ.get("REXRAG_BENCH_SMOLLM2") == "1":
            progress("loading SmolLM2-135M-Instruct")
            sm, tokenizer = load_smollm2()
            k = s["smollm2"]
            prompts = _prompts(k["prompts"], *k["len"], len(tokenizer), seed=3)
            config = (f"SmolLM2-135M-Instruct (fp32), {k['prompts']} prompts of {k['len'][0]}-{k['len'][1]} "
                      f"tokens, {k['new']} new, greedy, block 16, {card}")
            rows += _generation_rows("smollm2-135m", sm, prompts, k["new"], 16, config, sync, progress)
    finally:
        torch.set_num_threads(threads)
    return rows
