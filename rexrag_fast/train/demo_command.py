"""`rexrag-fast demo`: the embedded default run, on a CPU, no downloads: warm start, then GRPO vs REX-RAG.

    rexrag-fast demo [--seeds 0 1 2] [--steps N] [--out DIR] [--quick] [--model world-small|smollm2-135m]

1. demonstrations (`demonstrations.make_demonstrations`) of the embedded world's train questions, read
   through the real in-process retriever; a share of the 1-hop questions (--dead-end-rate, 0.6) is
   demonstrated as a dead end, a confident wrong answer without search, so the warm-started policy fails
   into dead ends on most 1-hop questions while it can solve them by searching;
2. warm start (`warm_start.train_warm_start`) of the policy on them, saved as an HF checkpoint in the cache
   under a content hash of (model, demonstrations, warm-start config), so a rerun skips it;
3. EM of the warm start on the held-out test questions (greedy agent loop);
4. for each seed, `steps` RL steps with algorithm.name=grpo and with algorithm.name=rexrag from the same
   warm start (configs/demo_cpu.yaml through `rexrag-fast train`, one subprocess per run, --resume: an
   interrupted run continues from its checkpoint when the demo is run again), then EM of each final model;
5. a table, <out>/demo.json and <out>/demo.png (training reward per step for both methods; held-out EM
   before and after, and the in-training validation val/em every trainer.test_freq steps).

What REX-RAG did is in the table: per run, the dead ends (originals with reward < 1), probes made and kept,
the kept probes' accuracy, the mean probe share alpha, and the kept probes' mean reward against the mean
reward of the groups they were forked from. Held-out EM is split into the question type the warm start
taught as dead ends (1-hop: `--dead-end-rate` of its demonstrations answer a wrong guess without search)
and the rest. The learning claims (does EM rise, does REX-RAG beat GRPO) are read from this report over
several seeds (`--seeds 0 1 2`); one seed of a few RL steps is noise, so no test asserts them.

Default model ("world-small"): a 2-layer Qwen2 (hidden 128, 1.5M parameters) with the world's own 8k BPE
tokenizer (`world_model`): with SmolLM2's 49k vocabulary the invented names take ~5.4 tokens each, the
tied embedding holds ~95% of the parameters and the model never learned to copy a name within the budget;
with the world tokenizer a name is ~2 tokens and copying appears after 500-900 warm-start steps.
SmolLM2-135M-Instruct (`--model smollm2-135m`, its own tokenizer) is the real model, but one forward/backward over
a batch of rollouts takes minutes on two CPU cores, so it cannot learn within the ~15 minute budget.
"""

from __future__ import annotations

import argparse
import json
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

METHODS = ("grpo", "rexrag")


def default_config_path() -> Path:
    """configs/demo_cpu.yaml of the source tree."""
    return Path(__file__).resolve().parents[2] / "configs" / "demo_cpu.yaml"


def build_model(name: str, tokenizer: Any, seed: int = 0) -> tuple[Any, dict[str, Any]]:
    """(fresh fp32 model, its description for the cache key) for --model 'world-small' or 'smollm2-135m'.

    'world-small' is world_model.small_model for `tokenizer` (transformers' initialisation, first loss ~
    log(vocab size))."""
    from rexrag_fast.train.models import SMOLLM2, WORLD_SMALL, load_model
    from rexrag_fast.train.world_model import small_model

    if name == SMOLLM2:
        return load_model(SMOLLM2)[0], {"name": SMOLLM2}
    if name == WORLD_SMALL:
        return small_model(tokenizer, seed)
    raise ValueError(f"--model must be {WORLD_SMALL!r} or {SMOLLM2!r}, got {name!r}")


DEAD_END_SOURCE = "world_1hop"  # the question type whose demonstrations include dead ends


def split_em(records: list[tuple[str, float]]) -> dict[str, float]:
    """{"all", "dead_end_type", "rest"}: mean EM of (data_source, em) pairs [N], overall, on the question
    type the warm start taught as dead ends, and on the others (0.0 for an empty part)."""
    def mean(xs: list[float]) -> float:
        return sum(xs) / len(xs) if xs else 0.0

    return {"all": mean([em for _, em in records]),
            "dead_end_type": mean([em for s, em in records if s == DEAD_END_SOURCE]),
            "rest": mean([em for s, em in records if s != DEAD_END_SOURCE])}


def eval_em(model_dir: Path, examples: list[Any], retriever: Any, cfg: Any, progress: bool) -> dict[str, float]:
    """Greedy EM of the checkpoint in `model_dir` on `examples` with the config's agent limits (`split_em`)."""
    import torch

    from rexrag_fast.agent.eval_command import evaluate
    from rexrag_fast.engine import EngineConfig, LLMEngine
    from rexrag_fast.engine.loaders import load_pretrained
    from rexrag_fast.train.rollout import agent_config

    model, tokenizer = load_pretrained(model_dir, dtype=torch.float32)
    agent = agent_config(cfg, seed=0)
    agent = type(agent)(**{**agent.__dict__, "temperature": 0.0})
    engine = LLMEngine(model, tokenizer=tokenizer, config=EngineConfig(num_blocks=2048, block_size=16,
                                                                       max_num_seqs=32, device="cpu"))
    records = evaluate(engine, retriever, examples, agent, tokenizer=tokenizer, batch_size=32, progress=progress)
    return split_em([(r.data_source, r.em) for r in records])


def run_rl(config_path: Path, warm_dir: Path, method: str, seed: int, steps: int, out_dir: Path) -> int:
    """One RL run through `rexrag-fast train --resume` in a subprocess; returns its exit status.

    Ctrl-C reaches the child too (same process group): the trainer checkpoints and exits; the demo waits."""
    cmd = [sys.executable, "-m", "rexrag_fast.cli", "train", "--config", str(config_path), "--resume",
           f"model.path={warm_dir}", f"algorithm.name={method}", f"trainer.seed={seed}",
           f"trainer.max_steps={steps}", f"trainer.output_dir={out_dir}"]
    proc = subprocess.Popen(cmd)
    try:
        return proc.wait()
    except KeyboardInterrupt:
        proc.send_signal(signal.SIGINT)
        proc.wait()
        raise


def summarize_run(metrics: list[dict[str, Any]]) -> dict[str, Any]:
    """Per-run figures from the trainer's metrics.jsonl rows."""
    def mean(key: str) -> float | None:
        vals = [r[key] for r in metrics if isinstance(r.get(key), (int, float))]
        return sum(vals) / len(vals) if vals else None

    def total(key: str) -> float:
        return float(sum(r.get(key, 0) or 0 for r in metrics))

    kept = total("rexrag/probes_kept")

    def kept_weighted(key: str) -> float | None:  # a mean over kept probes, not over steps
        if not kept:
            return None
        return sum((r.get(key) or 0) * (r.get("rexrag/probes_kept") or 0) for r in metrics) / kept

    val = [(r["step"], r["val/em"]) for r in metrics if isinstance(r.get("val/em"), (int, float))]
    return {
        "reward": [r.get("reward/mean") for r in metrics],
        "steps": [r["step"] for r in metrics],
        "val_steps": [s for s, _ in val],
        "val_em": [v for _, v in val],
        "dead_ends": total("rexrag/dead_ends"),
        "probes_made": total("rexrag/probes_made"),
        "probes_kept": kept,
        "probe_accuracy": kept_weighted("rexrag/probe_accuracy"),
        "alpha_mean": mean("rexrag/alpha"),
        "kept_probe_reward": kept_weighted("rexrag/kept_probe_reward"),
        "kept_probe_source_group_reward": kept_weighted("rexrag/kept_probe_source_group_reward"),
        "probe_cached_tokens": total("rexrag/probe_cached_tokens"),
        "tokens_per_s": {k.split("/", 1)[1]: mean(k) for k in sorted({k for r in metrics for k in r})
                         if k.startswith("throughput/")},
    }


def _pct(x: float | None) -> str:
    return "   -" if x is None else f"{100 * x:5.1f}"


def format_table(result: dict[str, Any]) -> str:
    """Plain-text tables: one row per (method, seed) with held-out EM after RL (all / the dead-end question
    type / the rest), training reward as the mean of the first and of the last 5 steps (one step's 32
    rollouts are too few to read alone) and throughput; then what REX-RAG did; then the per-method means."""
    before = result["em_before"]
    lines = [f"held-out EM before RL (warm start): {_pct(before['all'])}%  (1-hop, taught as dead ends: "
             f"{_pct(before['dead_end_type'])}%, rest: {_pct(before['rest'])}%; {result['n_eval']} test questions)",
             f"{'method':<8} {'seed':>4} {'EM all':>7} {'EM 1hop':>8} {'EM rest':>8} {'reward 1-5':>10} "
             f"{'reward -5..':>11} {'rollout tok/s':>13} {'probe tok/s':>11} {'update tok/s':>12}",
             "-" * 96]
    for run in result["runs"]:
        rw = [x for x in run["reward"] if x is not None]
        tps, em = run["tokens_per_s"], run["em_after"]
        first = sum(rw[:5]) / len(rw[:5]) if rw else float("nan")
        last = sum(rw[-5:]) / len(rw[-5:]) if rw else float("nan")
        lines.append(f"{run['method']:<8} {run['seed']:>4} {_pct(em['all']):>6}% {_pct(em['dead_end_type']):>7}% "
                     f"{_pct(em['rest']):>7}% {first:10.3f} {last:11.3f} "
                     f"{tps.get('rollout_tokens_per_s') or 0:13.1f} {tps.get('probe_tokens_per_s') or 0:11.1f} "
                     f"{tps.get('update_tokens_per_s') or 0:12.1f}")
    lines += ["", f"{'REX-RAG':<8} {'seed':>4} {'dead ends':>9} {'probes':>7} {'kept':>5} {'probe acc':>9} "
                  f"{'alpha':>6} {'kept reward':>11} {'source grp':>10} {'prefill saved':>13}", "-" * 96]
    for run in result["runs"]:
        if run["method"] != "rexrag":
            continue
        fmt = lambda x: "    -" if x is None else f"{x:.3f}"  # noqa: E731
        lines.append(f"{'rexrag':<8} {run['seed']:>4} {run['dead_ends']:9.0f} {run['probes_made']:7.0f} "
                     f"{run['probes_kept']:5.0f} {fmt(run['probe_accuracy']):>9} {fmt(run['alpha_mean']):>6} "
                     f"{fmt(run['kept_probe_reward']):>11} {fmt(run['kept_probe_source_group_reward']):>10} "
                     f"{run['probe_cached_tokens']:13.0f}")
    lines.append("-" * 96)
    for method in METHODS:
        runs = [r for r in result["runs"] if r["method"] == method]
        if runs:
            em = sum(r["em_after"]["all"] for r in runs) / len(runs)
            lines.append(f"{method:<8} mean EM after RL over {len(runs)} seed(s): {100 * em:.1f}% "
                         f"(before: {100 * before['all']:.1f}%)")
    return "\n".join(lines)


def plot(result: dict[str, Any], png: Path) -> Path:
    """Training reward per step (both methods, every seed) and held-out EM before/after RL."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_r, ax_e) = plt.subplots(1, 2, figsize=(11, 4))
    colors = {"grpo": "tab:blue", "rexrag": "tab:red"}
    for run in result["runs"]:
        pts = [(s, r) for s, r in zip(run["steps"], run["reward"]) if r is not None]
        if pts:
            steps, rewards = zip(*pts)
            ax_r.plot(steps, rewards, color=colors[run["method"]], alpha=0.15, linewidth=0.8)
            # 5-step trailing mean: the trend under the per-step noise of a small batch
            windows = [rewards[max(0, i - 4):i + 1] for i in range(len(rewards))]
            smooth = [sum(w) / len(w) for w in windows]
            ax_r.plot(steps, smooth, color=colors[run["method"]], alpha=0.9,
                      label=f"{run['method']} seed {run['seed']} (5-step mean)")
        ax_e.plot([0, max(run["steps"] or [0])], [result["em_before"]["all"], run["em_after"]["all"]], marker="o",
                  color=colors[run["method"]], alpha=0.8, label=f"{run['method']} seed {run['seed']}")
        if run.get("val_em"):  # the in-training validation (trainer.test_freq)
            ax_e.plot(run["val_steps"], run["val_em"], linestyle="--", marker=".", color=colors[run["method"]],
                      alpha=0.6, label=f"{run['method']} seed {run['seed']} val/em")
    ax_r.set(xlabel="RL step", ylabel="training reward (EM of rollouts)", title="reward")
    ax_e.set(xlabel="RL step", ylabel="held-out EM (greedy)", title="EM before / after RL")
    for ax in (ax_r, ax_e):
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    png.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(png, dpi=100)
    plt.close(fig)
    return png


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--seeds", type=int, nargs="+", default=[0], help="RL seeds (each runs GRPO and REX-RAG)")
    parser.add_argument("--steps", type=int, default=None, help="RL steps per run (default 30, --quick 12)")
    parser.add_argument("--out", type=Path, default=Path("outputs/demo"), help="output directory")
    parser.add_argument("--quick", action="store_true",
                        help="a short run: 12 RL steps instead of 30, 100 eval questions instead of 200")
    parser.add_argument("--model", default="world-small", choices=["world-small", "smollm2-135m"],
                        help="policy to warm-start")
    parser.add_argument("--config", type=Path, default=None, help="RL config (default configs/demo_cpu.yaml)")
    parser.add_argument("--warm-steps", type=int, default=None,
                        help="warm-start optimizer steps (default 1000)")
    parser.add_argument("--warm-lr", type=float, default=3e-3, help="warm-start peak learning rate")
    parser.add_argument("--dead-end-rate", type=float, default=0.6,
                        help="share of 1-hop demonstrations that answer a wrong guess without searching (default 0.6)")
    parser.add_argument("--n-demos", type=int, default=None,
                        help="train questions to demonstrate (default 1024)")
    parser.add_argument("--n-eval", type=int, default=None, help="held-out questions scored (default 200, --quick 100)")
    parser.add_argument("--no-progress", action="store_true")


def progress_line(done: int, total: int, elapsed_s: float) -> str:
    """'demo: 2/6 RL runs done in 5m 40s, about 11m 20s left' (the ETA assumes equal runs)."""
    def fmt(s: float) -> str:
        m, sec = divmod(int(round(s)), 60)
        return f"{m}m {sec:02d}s" if m else f"{sec}s"

    left = elapsed_s / done * (total - done) if done else float("nan")
    return f"demo: {done}/{total} RL runs done in {fmt(elapsed_s)}, about {fmt(left)} left"


def run(args: argparse.Namespace) -> int:
    from rexrag_fast.data.datasets import load_world_split
    from rexrag_fast.data.world import World, default_cache_dir, default_world_dir
    from rexrag_fast.engine.loaders import load_smollm2_tokenizer
    from rexrag_fast.retrieval import LocalRetriever
    from rexrag_fast.train.config import load_config
    from rexrag_fast.train.demonstrations import make_demonstrations
    from rexrag_fast.train.warm_start import WarmStartConfig, save_checkpoint_dir, train_warm_start, warm_start_key
    from rexrag_fast.train.world_model import load_world_tokenizer

    # The warm start is not shortened by --quick: copying names from the documents appears after 500-900 steps.
    steps = args.steps if args.steps is not None else (12 if args.quick else 30)
    warm_steps = args.warm_steps if args.warm_steps is not None else 1000
    n_demos = args.n_demos if args.n_demos is not None else 1024
    n_eval = args.n_eval if args.n_eval is not None else (100 if args.quick else 200)
    if not 0.0 <= args.dead_end_rate <= 1.0:
        raise SystemExit(f"--dead-end-rate must be in [0, 1], got {args.dead_end_rate}")
    for name, value in (("--steps", steps), ("--warm-steps", warm_steps), ("--n-demos", n_demos), ("--n-eval", n_eval)):
        if value < 1:
            raise SystemExit(f"{name} must be >= 1, got {value}")
    progress = not args.no_progress
    config_path = args.config or default_config_path()
    cfg = load_config(config_path)
    out: Path = args.out
    out.mkdir(parents=True, exist_ok=True)

    world_dir = default_world_dir()
    world = World.load(world_dir)
    tokenizer = load_smollm2_tokenizer() if args.model == "smollm2-135m" else load_world_tokenizer(world)
    retriever = LocalRetriever.for_world(world_dir, progress=progress)

    demos = make_demonstrations(world.split("train")[:n_demos], world, retriever, tokenizer, topk=cfg.retriever.topk,
                                max_obs_tokens=cfg.data.max_obs_length, max_start_length=cfg.data.max_start_length,
                                dead_end_rate={"1hop": args.dead_end_rate})
    print(f"demonstrations: {len(demos.demos)} kept ({demos.dead_ends} dead ends: a 1-hop question answered with a "
          f"wrong guess, no search), {len(demos.skipped)} skipped (retrieval missed a needed fact; coverage "
          f"{100 * demos.coverage:.1f}%)", flush=True)
    ws_cfg = WarmStartConfig(steps=warm_steps, batch_size=8, lr=args.warm_lr)
    model, spec = build_model(args.model, tokenizer)
    key = warm_start_key(spec, demos.content_hash(), ws_cfg)
    warm_dir = default_cache_dir() / f"warm_start-{key}"
    if (warm_dir / "config.json").is_file():
        print(f"warm start: cached {warm_dir}", flush=True)
        info = json.loads((warm_dir / "warm_start.json").read_text())
    else:
        losses = train_warm_start(model, [d.trajectory for d in demos.demos], ws_cfg, progress=progress)
        info = {"model": spec, "config": ws_cfg.__dict__, "losses": losses, "demos": len(demos.demos),
                "skipped": len(demos.skipped)}
        save_checkpoint_dir(model, tokenizer, warm_dir, info)
        print(f"warm start: loss {losses[0]:.3f} -> {losses[-1]:.3f}; saved {warm_dir}", flush=True)
    del model

    test = load_world_split("test")[:n_eval]
    em_before = eval_em(warm_dir, test, retriever, cfg, progress)
    print(f"held-out EM of the warm start: {100 * em_before['all']:.1f}%", flush=True)

    from rexrag_fast.train.metrics import read_metrics

    result: dict[str, Any] = {"model": spec, "warm_start_dir": str(warm_dir), "warm_start_losses": info["losses"],
                              "demonstrations": len(demos.demos), "skipped": len(demos.skipped),
                              "n_eval": len(test), "em_before": em_before, "steps": steps, "seeds": args.seeds,
                              "config": str(config_path), "runs": []}
    total_runs, runs_done, t_runs = len(args.seeds) * len(METHODS), 0, time.perf_counter()
    try:
        for seed in args.seeds:
            for method in METHODS:
                run_dir = out / f"{method}-seed{seed}"
                rc = run_rl(config_path, warm_dir, method, seed, steps, run_dir)
                if rc != 0:
                    print(f"rexrag-fast demo: the {method} run (seed {seed}) exited with status {rc}", file=sys.stderr)
                    return rc
                metrics = read_metrics(run_dir / "metrics.jsonl")
                em_after = eval_em(run_dir / "final", test, retriever, cfg, progress)
                result["runs"].append({"method": method, "seed": seed, "em_after": em_after,
                                       **summarize_run(metrics)})
                print(f"{method} seed {seed}: held-out EM {100 * em_before['all']:.1f}% -> "
                      f"{100 * em_after['all']:.1f}%", flush=True)
                runs_done += 1
                print(progress_line(runs_done, total_runs, time.perf_counter() - t_runs), flush=True)
    except KeyboardInterrupt:
        print("\ninterrupted: each RL run keeps its checkpoint; run the same command again to resume", file=sys.stderr)
        return 130
    table = format_table(result)
    print(table)
    (out / "demo.json").write_text(json.dumps(result, indent=1))
    (out / "demo.txt").write_text(table + "\n")
    png = plot(result, out / "demo.png")
    print(f"wrote {out / 'demo.json'}, {out / 'demo.txt'}, {png}", file=sys.stderr)
    return 0
