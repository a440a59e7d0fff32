"""Two gloo ranks keep ONE global top-K of their probes (rexrag_stage.keep_globally_best_probes).

Rank 0's probes are plausible (mean prompt log-prob near 0), rank 1's are not: with a budget of 4 over
6 + 6 probes, rank 0 keeps 4 and rank 1 none (a per-rank budget of 2 would keep 2 on each). Writes
<out>/rank<r>.json with the kept indices.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import numpy as np

from rexrag_fast.train import distributed as du
from rexrag_fast.train.rexrag_stage import keep_globally_best_probes

# Per rank: 3 originals then 6 probes; scores of originals are ignored.
SCORES = {
    0: [0.0, 0.0, 0.0, -0.3, -0.1, -0.9, -0.2, -0.5, -0.4],
    1: [0.0, 0.0, 0.0, -6.0, -5.0, -7.0, -4.0, -8.0, -9.0],
}
BUDGET = 4


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    args = ap.parse_args()
    du.init_distributed("gloo")
    rank = du.get_rank()
    is_probe = np.array([False] * 3 + [True] * 6)
    kept = keep_globally_best_probes(is_probe, np.array(SCORES[rank]), BUDGET)
    with open(os.path.join(args.out, f"rank{rank}.json"), "w") as f:
        json.dump({"kept": kept.tolist()}, f)
    du.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
