"""Time one sampling step on CPU, torch path against the C++ sampler: `python -m bench.sampler_micro [--json F]`.

16 rows x 49,152 vocabulary (SmolLM2's), logits 4 * N(0, 1), temperature 1, for top-p 0.9, top-k 50 and
plain temperature. The two paths run interleaved, one call each per round, so that load from other
processes on the machine falls on both alike; the median over rounds is reported.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch

from rexrag_fast.engine import SamplingParams, cpu_fused
from rexrag_fast.engine.sampling import _sample_cpp, _sample_torch

CASES = {"top_p 0.9": dict(top_p=0.9), "top_k 50": dict(top_k=50), "plain": {}}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=16)
    parser.add_argument("--vocab", type=int, default=49152)
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--json", help="also write the rows to this file")
    args = parser.parse_args()
    if not cpu_fused.available():
        raise SystemExit("rexrag_fast._C is built without the fused ops: nothing to compare")
    logits = 4 * torch.randn(args.rows, args.vocab, generator=torch.Generator().manual_seed(0))
    print(f"{args.rows} rows x {args.vocab} vocab, torch threads {torch.get_num_threads()}, "
          f"median of {args.rounds} rounds (ms per step)")
    print("| case | torch (batched) | C++ | speed-up |\n|---|---|---|---|")
    rows = []
    for name, kw in CASES.items():
        params = [SamplingParams(temperature=1.0, stop=(), **kw)] * args.rows
        gens = [torch.Generator().manual_seed(i) for i in range(args.rows)]
        times: dict[str, list[float]] = {"torch": [], "cpp": []}
        for r in range(args.rounds + 1):
            for path, fn in (("torch", _sample_torch), ("cpp", _sample_cpp)):
                t0 = time.perf_counter()
                fn(logits, params, gens)
                if r:  # the first round warms up
                    times[path].append(1e3 * (time.perf_counter() - t0))
        med = {k: statistics.median(v) for k, v in times.items()}
        print(f"| {name} | {med['torch']:.2f} ms | {med['cpp']:.2f} ms | {med['torch'] / med['cpp']:.1f}x |")
        rows.append({"case": name, "torch_ms": med["torch"], "cpp_ms": med["cpp"], "rows": args.rows,
                     "vocab": args.vocab, "threads": torch.get_num_threads(), "rounds": args.rounds})
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()
