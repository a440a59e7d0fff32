"""Stage `prefix_cache`: ops/s of the C++ radix prefix cache (rexrag_fast.cache) against a pure-Python
radix tree built like SGLang's (bench/baselines/radix_cache.py), on an RL-rollout workload.

Workload (block size 16): groups of 5-8 sequences share a 1-2k token prompt. The prompt is prefilled and
cached first; the group's original rollouts are admitted (match the prompt, lock, allocate the rest,
evicting LRU blocks when the fixed block budget is short) and finished (insert the full sequence, free
duplicates, unlock); then 1-3 branch rollouts fork from a random point of a finished sibling (REX-RAG
probes from a dead-end prefix) and go through the same admission and finish. Every call into the cache or
the allocator is timed separately; ops/s of a row = calls / seconds spent inside those calls: for each
operation type its fastest of 15 (tiny) or 5 repeats of the whole workload, without its slowest 1% of calls
(see TRIM), garbage collector off as in harness.time_fn.

Both implementations see the same sequences in their native form (the C++ cache int32 numpy arrays, the
Python tree lists) and must end with identical totals (matched tokens, blocks evicted, cached tokens), so
they did the same work. A second C++ row feeds Python lists to show the conversion cost.
"""

from __future__ import annotations

import dataclasses
import gc
import time
from collections import defaultdict

import numpy as np

from bench.baselines.radix_cache import PyBlockAllocator, PyRadixCache
from bench.harness import Progress, Row, stage
from rexrag_fast.cache import BlockAllocator, PrefixCache

BLOCK_SIZE = 16
VOCAB = 32000
CACHE_OPS = ("match", "insert", "evict", "lock", "unlock")
ALLOC_OPS = ("allocate", "free")
# Share of each operation type's slowest calls left out. On a shared machine the OS preempts a process for
# milliseconds at a time, and a preempted call costs as much as thousands of C++ calls; the same rule applies
# to both implementations, and each row's extra["untrimmed_speedup"] keeps the figure without it.
TRIM = 0.01


@dataclasses.dataclass(frozen=True)
class Workload:
    phases: list[list[tuple[np.ndarray, np.ndarray]]]  # per phase: (admission prefix, full sequence)
    num_blocks: int
    num_sequences: int

    def as_lists(self) -> list[list[tuple[list[int], list[int]]]]:
        return [[(a.tolist(), f.tolist()) for a, f in phase] for phase in self.phases]


PRESET_SIZES = {
    "tiny": dict(groups=60, num_blocks=3072, repeats=15),
    "qwen2.5-3b": dict(groups=400, num_blocks=16384, repeats=5),
}


def make_workload(groups: int, num_blocks: int, seed: int = 0) -> Workload:
    rng = np.random.default_rng(seed)
    phases: list[list[tuple[np.ndarray, np.ndarray]]] = []
    count = 0
    for _ in range(groups):
        prompt = rng.integers(0, VOCAB, int(rng.integers(1024, 2049)), dtype=np.int32)
        size = int(rng.integers(5, 9))
        num_branches = int(rng.integers(1, size // 2 + 1))
        originals = [np.concatenate([prompt, rng.integers(0, VOCAB, int(rng.integers(128, 1025)), dtype=np.int32)])
                     for _ in range(size - num_branches)]
        branches = []
        for _ in range(num_branches):
            parent = originals[int(rng.integers(len(originals)))]
            cut = int(rng.integers(len(prompt), len(parent) + 1))
            tail = rng.integers(0, VOCAB, int(rng.integers(64, 513)), dtype=np.int32)
            branches.append((parent[:cut], np.concatenate([parent[:cut], tail])))
        phases.append([(prompt, prompt)])
        phases.append([(prompt, s) for s in originals])
        phases.append(branches)
        count += 1 + size
    return Workload(phases, num_blocks, count)


def run_cpp(work: Workload, phases) -> tuple[dict[str, list[int]], tuple[int, int, int]]:
    """Drives rexrag_fast.cache; returns {op: [ns of each call]} and (matched tokens, evicted blocks, cached
    tokens)."""
    alloc = BlockAllocator(work.num_blocks)
    cache = PrefixCache(BLOCK_SIZE, alloc)
    clock = time.perf_counter_ns
    t: dict[str, list[int]] = defaultdict(list)
    matched = evicted = 0
    for phase in phases:
        running = []
        for admit, full in phase:
            t0 = clock()
            m = cache.match_prefix(admit)
            t1 = clock()
            cache.lock(m.handle)
            t2 = clock()
            t["match"].append(t1 - t0)
            t["lock"].append(t2 - t1)
            n_matched = len(m.block_ids)
            matched += n_matched * BLOCK_SIZE
            need = len(full) // BLOCK_SIZE - n_matched
            short = need - alloc.num_free
            if short > 0:
                t0 = clock()
                evicted += cache.evict(short)
                t["evict"].append(clock() - t0)
            t0 = clock()
            new = alloc.allocate(need)
            t["allocate"].append(clock() - t0)
            running.append((full, m, new))
        for full, m, new in running:
            ids = np.concatenate([m.block_ids, new])
            t0 = clock()
            n_cached = cache.insert(full, ids)
            t1 = clock()
            t["insert"].append(t1 - t0)
            dup = n_cached // BLOCK_SIZE - len(m.block_ids)
            if dup > 0:
                t0 = clock()
                alloc.free(new[:dup])
                t["free"].append(clock() - t0)
            t0 = clock()
            cache.unlock(m.handle)
            t["unlock"].append(clock() - t0)
    cache.check_invariants()
    return dict(t), (matched, evicted, cache.cached_tokens)


def run_python(work: Workload, phases) -> tuple[dict[str, list[int]], tuple[int, int, int]]:
    """The same driver over the pure-Python baseline."""
    alloc = PyBlockAllocator(work.num_blocks)
    cache = PyRadixCache(BLOCK_SIZE, alloc)
    clock = time.perf_counter_ns
    t: dict[str, list[int]] = defaultdict(list)
    matched = evicted = 0
    for phase in phases:
        running = []
        for admit, full in phase:
            t0 = clock()
            blocks, node = cache.match_prefix(admit)
            t1 = clock()
            cache.lock(node)
            t2 = clock()
            t["match"].append(t1 - t0)
            t["lock"].append(t2 - t1)
            matched += len(blocks) * BLOCK_SIZE
            need = len(full) // BLOCK_SIZE - len(blocks)
            short = need - alloc.num_free
            if short > 0:
                t0 = clock()
                evicted += cache.evict(short)
                t["evict"].append(clock() - t0)
            t0 = clock()
            new = alloc.allocate(need)
            t["allocate"].append(clock() - t0)
            running.append((full, blocks, node, new))
        for full, blocks, node, new in running:
            ids = blocks + new
            t0 = clock()
            n_cached = cache.insert(full, ids)
            t1 = clock()
            t["insert"].append(t1 - t0)
            dup = n_cached // BLOCK_SIZE - len(blocks)
            if dup > 0:
                t0 = clock()
                alloc.free(new[:dup])
                t["free"].append(clock() - t0)
            t0 = clock()
            cache.unlock(node)
            t["unlock"].append(clock() - t0)
    return dict(t), (matched, evicted, cache.cached_tokens)


def best_seconds(runs: list[dict[str, list[int]]], trim: float) -> dict[str, tuple[float, int]]:
    """{op: (seconds, calls)} from each operation type's fastest repeat, after dropping its slowest `trim`
    share of calls. Every repeat makes the same calls."""
    out = {}
    for op in runs[0]:
        best = None
        for t in runs:
            d = sorted(t[op])
            keep = len(d) - int(len(d) * trim)
            best = min(best or (float("inf"), 0), (sum(d[:keep]) * 1e-9, keep))
        out[op] = best
    return out


def rates(runs: list[dict[str, list[int]]], groups: dict[str, tuple[str, ...]], trim: float) -> dict[str, float]:
    """ops/s per row; a row over several operation types adds their calls and their seconds."""
    best = best_seconds(runs, trim)
    out = {}
    for name, ops in groups.items():
        seconds = sum(best[o][0] for o in ops if o in best)
        out[name] = sum(best[o][1] for o in ops if o in best) / seconds if seconds else float("nan")
    return out


@stage("prefix_cache")
def prefix_cache_stage(preset: str, progress: Progress) -> list[Row]:
    sizes = PRESET_SIZES[preset]
    work = make_workload(sizes["groups"], sizes["num_blocks"])
    lists = work.as_lists()
    repeats = sizes["repeats"]
    progress(f"{work.num_sequences} sequences in {sizes['groups']} groups, budget {work.num_blocks} blocks")

    cpp_runs, cpp_list_runs, py_runs = [], [], []
    totals = set()
    for r in range(repeats):
        for runs, driver, phases in ((cpp_runs, run_cpp, work.phases), (cpp_list_runs, run_cpp, lists),
                                     (py_runs, run_python, lists)):
            gc.collect()
            gc.disable()
            try:
                t, tot = driver(work, phases)
            finally:
                gc.enable()
            runs.append(t)
            totals.add(tot)
        if (r + 1) % 5 == 0:
            progress(f"repeat {r + 1}/{repeats} done")
    if len(totals) != 1:
        raise RuntimeError(f"C++ and Python caches disagree on (matched tokens, evicted, cached): {totals}")
    matched, evicted, cached = totals.pop()

    groups = {"match": ("match",), "insert": ("insert",), "evict": ("evict",), "lock+unlock": ("lock", "unlock"),
              "combined": CACHE_OPS, "allocator": ALLOC_OPS}
    cpp, cpp_list, py = (rates(r, groups, TRIM) for r in (cpp_runs, cpp_list_runs, py_runs))
    cpp_all, cpp_list_all, py_all = (rates(r, groups, 0.0) for r in (cpp_runs, cpp_list_runs, py_runs))
    counts = {name: sum(len(cpp_runs[0].get(o, ())) for o in ops) for name, ops in groups.items()}
    config = f"bs={BLOCK_SIZE} seqs={work.num_sequences} budget={work.num_blocks}"
    extra = {"matched_tokens": matched, "evicted_blocks": evicted, "final_cached_tokens": cached}
    rows = [
        Row("prefix_cache", f"{name} (numpy tokens)", cpp[name], "ops/s", py[name], "python radix tree",
            config, {**extra, "calls": counts[name], "untrimmed_speedup": cpp_all[name] / py_all[name]})
        for name in groups
    ]
    rows.append(Row("prefix_cache", "combined (list tokens)", cpp_list["combined"], "ops/s", py["combined"],
                    "python radix tree", config,
                    {**extra, "calls": counts["combined"],
                     "untrimmed_speedup": cpp_list_all["combined"] / py_all["combined"]}))
    return rows
