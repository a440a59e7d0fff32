"""rexrag-fast's one benchmark report: every registered stage, one table, optional JSON.

    python bench/throughput.py                      # all stages, preset tiny on CPU
    python bench/throughput.py --only policy_loss   # one stage
    python bench/throughput.py --preset qwen2.5-3b --json out.json   # GPU shapes
    python bench/throughput.py --merge a.json b.json --json all.json  # one table from several runs' JSON
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib
import json
import pkgutil
import sys
import time
import traceback
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench import stages as stage_pkg  # noqa: E402
from bench.harness import (  # noqa: E402
    PRESETS,
    SKIPS,
    STAGES,
    Peaks,
    Progress,
    Roofline,
    Row,
    environment,
    format_skips,
    format_table,
)


def stage_modules() -> list[str]:
    """Names of the modules bench/stages/<name>.py; each registers the stage of the same name."""
    return sorted(m.name for m in pkgutil.iter_modules(stage_pkg.__path__))


def load_stages(names: list[str] | None = None) -> None:
    """Import the stage modules `names` (default: all), which registers their stages."""
    for name in stage_modules() if names is None else names:
        importlib.import_module(f"bench.stages.{name}")


def main(argv: list[str] | None = None) -> int:
    modules = stage_modules()
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--only", action="append", choices=sorted(set(modules) | set(STAGES)),
                        help="run only this stage (repeatable)")
    parser.add_argument("--preset", choices=PRESETS, default=None,
                        help="problem sizes: tiny (default without a GPU) or qwen2.5-3b (GPU shapes)")
    parser.add_argument("--json", type=Path, default=None, help="write {env, rows} as JSON here")
    parser.add_argument("--quick", action="store_true",
                        help="rehearsal: stages that honour it measure only their smallest case (not for reports)")
    parser.add_argument("--merge", type=Path, nargs="+", default=None, metavar="JSON",
                        help="run nothing: print one table of these runs' JSON files (and write it with --json)")
    args = parser.parse_args(argv)
    if args.merge:
        return merge(args.merge, args.json)
    # Only the stages asked for are imported: each one imports its own heavy dependencies.
    load_stages([n for n in args.only if n in modules] if args.only else None)

    import torch

    from bench import harness

    harness.QUICK = args.quick
    preset = args.preset or ("qwen2.5-3b" if torch.cuda.is_available() else "tiny")
    names = args.only or sorted(STAGES)
    rows: list[Row] = []
    failed: list[str] = []
    SKIPS.clear()
    t0 = time.perf_counter()
    for i, name in enumerate(names, 1):
        print(f"[{i}/{len(names)}] stage {name} (preset {preset})", file=sys.stderr, flush=True)
        try:
            rows.extend(STAGES[name](preset, Progress(name)))
        except Exception:
            traceback.print_exc()
            failed.append(name)
    print(format_table(rows))
    peaks = list({r.roofline.peaks: None for r in rows if r.roofline})
    for p in peaks:
        print(f"roofline ceilings, {p.device}: {p.bandwidth / 1e9:,.1f} GB/s, {p.flops / 1e12:,.3g} TFLOP/s "
              f"{p.flops_dtype} ({p.source})")
    if SKIPS:
        print(format_skips(SKIPS))
    print(f"\n{len(rows)} rows from {len(names) - len(failed)} stages in {time.perf_counter() - t0:.1f}s"
          + (f"; FAILED: {', '.join(failed)}" if failed else ""))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        payload = {"env": environment(preset), "rows": [r.to_json() for r in rows], "failed": failed,
                   "skipped": [dataclasses.asdict(s) for s in SKIPS], "peaks": [p.to_json() for p in peaks]}
        args.json.write_text(json.dumps(payload, indent=2))
        print(f"wrote {args.json}")
    return 1 if failed else 0


def _row_from_json(r: dict) -> Row:
    roof = r.get("roofline")
    roofline = None
    if roof:
        roofline = Roofline(roof["bytes_per_call"], roof["flops_per_call"], roof["seconds_per_call"],
                            Peaks(**roof["peaks"]))
    return Row(**{k: v for k, v in r.items() if k not in ("speedup", "roofline")}, roofline=roofline)


def merge(paths: list[Path], out: Path | None) -> int:
    """One table and one JSON from several runs' JSON files (scripts/gpu_check.sh runs a stage per process,
    each under its own timeout). The env is the first file's; rows, failures, skips and ceilings are joined."""
    payloads = []
    for path in paths:
        try:
            payloads.append(json.loads(path.read_text()))
        except (OSError, json.JSONDecodeError) as e:
            print(f"--merge: cannot read {path}: {e}", file=sys.stderr)
            return 2
    merged = {"env": payloads[0]["env"], "rows": [], "failed": [], "skipped": [], "peaks": []}
    for p in payloads:
        for key in ("rows", "failed", "skipped", "peaks"):
            merged[key] += [x for x in p.get(key, []) if x not in merged[key]]
    rows = [_row_from_json(r) for r in merged["rows"]]
    print(format_table(rows))
    for p in merged["peaks"]:
        print(f"roofline ceilings, {p['device']}: {p['bandwidth'] / 1e9:,.1f} GB/s, {p['flops'] / 1e12:,.3g} TFLOP/s "
              f"{p['flops_dtype']} ({p['source']})")
    for sk in merged["skipped"]:
        print(f"skipped: {sk['stage']}: {sk['what']}: {sk['reason']}")
    print(f"\n{len(rows)} rows merged from {len(paths)} files"
          + (f"; FAILED: {', '.join(merged['failed'])}" if merged["failed"] else ""))
    if out:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(merged, indent=2))
        print(f"wrote {out}")
    return 0  # the stages that failed were reported (and counted) by their own runs


if __name__ == "__main__":
    sys.exit(main())
