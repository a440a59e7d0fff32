"""rexrag-fast's one benchmark report: every registered stage, one table, optional JSON.

    python bench/throughput.py                      # all stages, preset tiny on CPU
    python bench/throughput.py --only policy_loss   # one stage
    python bench/throughput.py --preset qwen2.5-3b --json out.json   # GPU shapes
"""

from __future__ import annotations

import argparse
import importlib
import json
import pkgutil
import sys
import time
import traceback
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench import stages as stage_pkg  # noqa: E402
from bench.harness import PRESETS, STAGES, Progress, Row, environment, format_table  # noqa: E402


def load_stages() -> None:
    for mod in sorted(pkgutil.iter_modules(stage_pkg.__path__), key=lambda m: m.name):
        importlib.import_module(f"bench.stages.{mod.name}")


def main(argv: list[str] | None = None) -> int:
    load_stages()
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--only", action="append", choices=sorted(STAGES), help="run only this stage (repeatable)")
    parser.add_argument("--preset", choices=PRESETS, default=None,
                        help="problem sizes: tiny (default without a GPU) or qwen2.5-3b (GPU shapes)")
    parser.add_argument("--json", type=Path, default=None, help="write {env, rows} as JSON here")
    args = parser.parse_args(argv)

    import torch

    preset = args.preset or ("qwen2.5-3b" if torch.cuda.is_available() else "tiny")
    names = args.only or sorted(STAGES)
    rows: list[Row] = []
    failed: list[str] = []
    t0 = time.perf_counter()
    for i, name in enumerate(names, 1):
        print(f"[{i}/{len(names)}] stage {name} (preset {preset})", file=sys.stderr, flush=True)
        try:
            rows.extend(STAGES[name](preset, Progress(name)))
        except Exception:
            traceback.print_exc()
            failed.append(name)
    print(format_table(rows))
    print(f"\n{len(rows)} rows from {len(names) - len(failed)} stages in {time.perf_counter() - t0:.1f}s"
          + (f"; FAILED: {', '.join(failed)}" if failed else ""))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        payload = {"env": environment(preset), "rows": [r.to_json() for r in rows], "failed": failed}
        args.json.write_text(json.dumps(payload, indent=2))
        print(f"wrote {args.json}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
