"""Per-step metrics: what one RL step counts and times (`StepMetrics`), the step's reduced figures
(`summarize_step`), and where they go: a JSONL file, a tqdm bar, TensorBoard when installed, and curves as a
PNG at the end (`MetricsLogger`).

Metric names are `section/name` as in verl (`reward/mean`, `actor/pg_clipfrac`, `actor/kl`,
`throughput/train_tokens_per_s`, `memory/peak_bytes`, ...). Each JSONL line is one step:

    {"step": 12, "time": 1764080000.1, "reward/mean": 0.41, "actor/loss": 0.013, ...}

Only rank 0 writes (`enabled=False` elsewhere). On resume from step k the file is appended to; lines with
step > k (written after the checkpoint by the run that died) are dropped first, so the file again describes
one consistent run.

Backends (`trainer.logger`, as verl's): console (one compact line per step), tensorboard, wandb (offline
when WANDB_MODE=offline), mlflow (a file store under <output_dir>/mlruns unless MLFLOW_TRACKING_URI is set).
wandb and mlflow are optional (`pip install "rexrag-fast[loggers]"`). Every record also carries verl's name
for each quantity verl logs too (`VERL_METRIC_NAMES`: critic/score/mean, response_length/mean, timing_s/*,
perf/*), so verl dashboards read our runs.
"""

from __future__ import annotations

import contextlib
import json
import math
import resource
import sys
import time
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from rexrag_fast.train import distributed as du

METRICS_FILE = "metrics.jsonl"
CURVES_FILE = "curves.png"
REWARD_KEYS = ("reward/mean", "reward/em", "reward")
THROUGHPUT_PREFIX = "throughput/"


def peak_memory_bytes(device: torch.device | None = None) -> int:
    """Peak memory so far: CUDA max allocated on a GPU device, else this process's peak resident set."""
    if device is not None and device.type == "cuda":
        return int(torch.cuda.max_memory_allocated(device))
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(rss if sys.platform == "darwin" else rss * 1024)  # Linux reports KiB


class StepMetrics:
    """What one rank counts and times during one RL step; `reduce()` combines every rank's (collective).

    add(key, v): a count or sum, added over ranks ("count/..." or "sum/..." by convention).
    timer(key): seconds spent in a `with` block, averaged over ranks ("time/..."); a rank that never timed
    `key` counts 0 for it, so ranks need not agree on the keys (one that made no probes reports no probe time).
    """

    def __init__(self) -> None:
        self.sums: dict[str, float] = {}
        self.times: dict[str, float] = {}

    def copy(self) -> StepMetrics:
        out = StepMetrics()
        out.sums, out.times = dict(self.sums), dict(self.times)
        return out

    def add(self, key: str, value: float) -> None:
        self.sums[key] = self.sums.get(key, 0.0) + float(value)

    def set_time(self, key: str, seconds: float) -> None:
        self.times[key] = float(seconds)

    @contextlib.contextmanager
    def timer(self, key: str) -> Iterator[None]:
        t0 = time.perf_counter()
        try:
            yield
        finally:
            self.times[key] = self.times.get(key, 0.0) + time.perf_counter() - t0

    def reduce(self) -> tuple[dict[str, float], dict[str, float]]:
        """(sums over ranks, mean times over ranks), each keyed by every key any rank reported. Collective."""
        parts = du.gather_objects((self.sums, self.times))
        sums: dict[str, float] = {}
        times: dict[str, float] = {}
        for s, t in parts:
            for k, v in s.items():
                sums[k] = sums.get(k, 0.0) + v
            for k, v in t.items():
                times[k] = times.get(k, 0.0) + v
        return sums, {k: v / len(parts) for k, v in times.items()}


def _rate(tokens: float, seconds: float) -> float:
    return tokens / seconds if seconds > 0 else 0.0


def summarize_step(sums: Mapping[str, float], times: Mapping[str, float], *, ppo_epochs: int,
                   rexrag: bool) -> dict[str, float]:
    """The step's reported figures from `StepMetrics.reduce()`'s sums and mean times.

        reward/mean = sum/reward / count/originals   (probes excluded; = reward/em, the reward is exact match)
        rollout/*_mean = sum/* / count/originals      throughput/X = tokens of X / time of X
    """
    n_orig = max(sums.get("count/originals", 0.0), 1.0)
    probes = sums.get("count/probes_made", 0.0)
    out: dict[str, float] = {"reward/mean": sums["sum/reward"] / n_orig}
    out["reward/em"] = out["reward/mean"]
    if rexrag:
        out["rexrag/probes_made"] = probes
    if probes:
        out["reward/probe_mean"] = sums["sum/probe_reward"] / probes
    out["rollout/searches_mean"] = sums["sum/searches"] / n_orig
    out["rollout/answered_frac"] = sums["sum/answered"] / n_orig
    out["rollout/response_len_mean"] = sums["sum/response_len"] / n_orig
    out["rollout/logprob_abs_diff"] = sums["sum/rollout_logprob_abs_diff"] / max(sums["count/response_tokens_all"], 1)
    out["batch/train_tokens"] = sums["count/train_tokens"]
    out["batch/train_sequences"] = sums["count/train_sequences"]
    out["throughput/rollout_tokens_per_s"] = _rate(sums.get("count/rollout_generated_tokens", 0.0),
                                                   times.get("time/rollout_s", 0.0))
    if probes:
        out["throughput/probe_tokens_per_s"] = _rate(sums["count/probe_generated_tokens"], times["time/probe_s"])
        out["rexrag/probe_cached_tokens"] = sums["count/probe_cached_tokens"]
    all_tokens = sums.get("count/rollout_tokens", 0.0) + sums.get("count/probe_tokens", 0.0)
    out["throughput/old_logprob_tokens_per_s"] = _rate(all_tokens, times["time/old_logprob_s"])
    if "time/ref_logprob_s" in times:
        out["throughput/ref_logprob_tokens_per_s"] = _rate(sums["count/train_tokens"], times["time/ref_logprob_s"])
    out["throughput/update_tokens_per_s"] = _rate(sums["count/train_tokens"] * ppo_epochs, times["time/update_s"])
    out["throughput/train_tokens_per_s"] = _rate(all_tokens, times["time/step_s"])
    out.update({k.replace("time/", "timing/"): v for k, v in times.items()})
    return out


def read_metrics(path: str | Path) -> list[dict[str, Any]]:
    """The JSONL lines of `path` as dicts (a torn last line from a crash is skipped)."""
    rows = []
    for line in Path(path).read_text().splitlines():
        if not line.strip():
            continue
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return rows


def _scalar(v: Any) -> float | int | str | bool | None:
    if isinstance(v, torch.Tensor):
        v = v.detach().float().item() if v.numel() == 1 else None
    if hasattr(v, "item") and not isinstance(v, (str, bytes)):  # numpy scalars
        v = v.item()
    return v if isinstance(v, (int, float, str, bool)) or v is None else str(v)


# ours -> verl's name for the same quantity (verl/trainer/ppo/metric_utils.py, Search-R1's env/* metrics).
VERL_METRIC_NAMES: dict[str, str] = {
    "reward/mean": "critic/score/mean",  # no KL in the reward: score = reward
    "rollout/response_len_mean": "response_length/mean",
    "rollout/searches_mean": "env/number_of_valid_search",
    "rollout/answered_frac": "env/finish_ratio",
    "timing/rollout_s": "timing_s/gen",
    "timing/old_logprob_s": "timing_s/old_log_prob",
    "timing/ref_logprob_s": "timing_s/ref",
    "timing/update_s": "timing_s/update_actor",
    "timing/step_s": "timing_s/step",
    "batch/train_tokens": "perf/total_num_tokens",
}
# verl's per-GPU throughput and memory in GiB, from ours.
_VERL_DERIVED = {
    "perf/throughput": ("throughput/train_tokens_per_s", lambda v: v / du.get_world_size()),
    "perf/max_memory_allocated_gb": ("memory/peak_bytes", lambda v: v / 2**30),
}
BACKENDS = ("console", "tensorboard", "wandb", "mlflow")
_INSTALL = {"wandb": "wandb", "mlflow": "mlflow-skinny"}
CONSOLE_KEYS = (("reward", "reward/mean"), ("loss", "actor/loss"), ("kl", "actor/kl_loss"),
                ("len", "rollout/response_len_mean"), ("tok/s", "throughput/train_tokens_per_s"),
                ("s", "timing/step_s"))


def with_verl_names(metrics: Mapping[str, Any]) -> dict[str, Any]:
    """`metrics` plus verl's name for every quantity in VERL_METRIC_NAMES and _VERL_DERIVED that it holds."""
    out = dict(metrics)
    for ours, theirs in VERL_METRIC_NAMES.items():
        if ours in metrics:
            out[theirs] = metrics[ours]
    for theirs, (ours, f) in _VERL_DERIVED.items():
        if isinstance(metrics.get(ours), (int, float)):
            out[theirs] = f(float(metrics[ours]))
    return out


def check_backends(names: Sequence[str]) -> None:
    """ImportError naming the package to install for each optional backend in `names` that is missing."""
    import importlib.util

    missing = [n for n in names if n in _INSTALL and importlib.util.find_spec(n) is None]
    if missing:
        pkgs = " ".join(_INSTALL[n] for n in missing)
        raise ImportError(f"trainer.logger lists {missing}, not installed: pip install {pkgs} "
                          "(or pip install \"rexrag-fast[loggers]\")")


def logger_options(trainer_cfg: Any, config: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """MetricsLogger keyword arguments from a TrainerConfig (trainer.logger, trainer.tensorboard, names)."""
    backends = [b for b in trainer_cfg.logger if b != "tensorboard" or trainer_cfg.tensorboard]
    return {"backends": backends, "project_name": trainer_cfg.project_name,
            "experiment_name": trainer_cfg.experiment_name, "config": config}


def console_line(step: int, total: int | None, record: Mapping[str, Any]) -> str:
    """'step 3/20 | reward 0.25 | loss 0.0132 | ...' from the CONSOLE_KEYS present in `record`."""
    parts = [f"step {step}" + (f"/{total}" if total else "")]
    parts += [f"{label} {record[k]:.4g}" for label, k in CONSOLE_KEYS
              if isinstance(record.get(k), (int, float)) and not isinstance(record.get(k), bool)]
    return " | ".join(parts)


def _flat_params(config: Mapping[str, Any], prefix: str = "") -> dict[str, str]:
    out: dict[str, str] = {}
    for k, v in config.items():
        if isinstance(v, Mapping):
            out.update(_flat_params(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = str(v)
    return out


class MetricsLogger:
    """Write one record per step to `<output_dir>/metrics.jsonl`, tqdm and the backends of trainer.logger."""

    def __init__(
        self,
        output_dir: str | Path,
        *,
        total_steps: int | None = None,
        start_step: int = 0,
        enabled: bool = True,
        tensorboard: bool = True,
        progress_bar: bool = True,
        postfix_keys: Sequence[str] = ("reward/mean", "actor/loss", "throughput/train_tokens_per_s"),
        backends: Sequence[str] | None = None,
        project_name: str = "rexrag-fast",
        experiment_name: str = "run",
        config: Mapping[str, Any] | None = None,
    ) -> None:
        """backends: names of BACKENDS (None: tensorboard when `tensorboard`, as before trainer.logger)."""
        self.enabled = enabled
        self.output_dir = Path(output_dir)
        self.path = self.output_dir / METRICS_FILE
        self.postfix_keys = tuple(postfix_keys)
        self.total_steps = total_steps
        backends = list(backends) if backends is not None else (["tensorboard"] if tensorboard else [])
        unknown = [b for b in backends if b not in BACKENDS]
        if unknown:
            raise ValueError(f"backends: expected names of {list(BACKENDS)}, got {unknown}")
        self.console = "console" in backends
        self._tb = None
        self._bar = None
        self._file = None
        self._wandb = None
        self._mlflow = None
        if not enabled:
            return
        check_backends(backends)
        self.output_dir.mkdir(parents=True, exist_ok=True)
        if self.path.exists():
            kept = [r for r in read_metrics(self.path) if int(r.get("step", 0)) <= start_step]
            self.path.write_text("".join(json.dumps(r) + "\n" for r in kept))
        # Line-buffered: a crash loses at most one line. Closed in close().
        self._file = open(self.path, "a", buffering=1)  # noqa: SIM115
        if "wandb" in backends:
            self._wandb = self._start_wandb(project_name, experiment_name, config)
        if "mlflow" in backends:
            self._mlflow = self._start_mlflow(project_name, experiment_name, config)
        if "tensorboard" in backends:
            try:
                from torch.utils.tensorboard import SummaryWriter

                self._tb = SummaryWriter(log_dir=str(self.output_dir / "tensorboard"), purge_step=start_step + 1)
            except ImportError:  # tensorboard is optional; the JSONL file has everything
                self._tb = None
        if progress_bar:
            from tqdm import tqdm

            self._bar = tqdm(total=total_steps, initial=start_step, desc="train", unit="step", dynamic_ncols=True)

    @property
    def tensorboard_enabled(self) -> bool:
        return self._tb is not None

    def _run_id(self, name: str) -> str | None:
        """The run id a backend recorded in output_dir (so a resumed run continues the same run), or None."""
        path = self.output_dir / f".{name}_run_id"
        return path.read_text().strip() if path.is_file() else None

    def _save_run_id(self, name: str, run_id: str) -> None:
        (self.output_dir / f".{name}_run_id").write_text(run_id + "\n")

    def _start_wandb(self, project: str, name: str, config: Mapping[str, Any] | None) -> Any:
        import wandb

        run_id = self._run_id("wandb")
        run = wandb.init(project=project, name=name, config=dict(config or {}), dir=str(self.output_dir),
                         id=run_id, resume="allow" if run_id else None)
        self._save_run_id("wandb", run.id)
        return run

    def _start_mlflow(self, project: str, name: str, config: Mapping[str, Any] | None) -> Any:
        import os

        import mlflow

        uri = os.environ.get("MLFLOW_TRACKING_URI")
        if not uri:  # the run's own file store: no server, no database package (mlflow 3 asks to opt in)
            uri = (self.output_dir / "mlruns").resolve().as_uri()
            os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
        client = mlflow.tracking.MlflowClient(tracking_uri=uri)
        run_id = self._run_id("mlflow")
        if run_id is None:
            exp = client.get_experiment_by_name(project)
            exp_id = exp.experiment_id if exp is not None else client.create_experiment(project)
            run_id = client.create_run(exp_id, run_name=name).info.run_id
            for k, v in _flat_params(config or {}).items():
                client.log_param(run_id, k, v[:500])
            self._save_run_id("mlflow", run_id)
        return client, run_id

    def log(self, step: int, metrics: Mapping[str, Any]) -> dict[str, Any]:
        """Record `metrics` for `step`; returns the record written."""
        record: dict[str, Any] = {"step": int(step), "time": time.time()}
        record.update({k: _scalar(v) for k, v in with_verl_names(metrics).items()})
        if not self.enabled:
            return record
        assert self._file is not None
        self._file.write(json.dumps(record) + "\n")
        numbers = {k: float(v) for k, v in record.items()
                   if k not in ("step", "time") and isinstance(v, (int, float)) and not isinstance(v, bool)}
        if self._tb is not None:
            for k, v in numbers.items():
                self._tb.add_scalar(k, v, step)
        if self._wandb is not None:
            self._wandb.log(numbers, step=int(step))
        if self._mlflow is not None:
            from mlflow.entities import Metric

            client, run_id = self._mlflow
            now = int(record["time"] * 1000)
            client.log_batch(run_id, metrics=[Metric(k, v, now, int(step)) for k, v in numbers.items()
                                              if math.isfinite(v)])
        if self.console:
            line = console_line(int(step), self.total_steps, record)
            if self._bar is not None:
                self._bar.write(line)
            else:
                print(line, flush=True)
        if self._bar is not None:
            self._bar.update(step - self._bar.n)
            post = {k.split("/")[-1]: f"{record[k]:.4g}" for k in self.postfix_keys
                    if isinstance(record.get(k), (int, float))}
            if post:
                self._bar.set_postfix(post, refresh=False)
        return record

    def close(self, plot: bool = True) -> Path | None:
        """Flush and close everything; draw the curves PNG when `plot`. Returns the PNG path if drawn."""
        if not self.enabled:
            return None
        png = None
        if self._file is not None:
            self._file.close()
            self._file = None
        if self._tb is not None:
            self._tb.close()
            self._tb = None
        if self._wandb is not None:
            self._wandb.finish()
            self._wandb = None
        if self._mlflow is not None:
            client, run_id = self._mlflow
            client.set_terminated(run_id)
            self._mlflow = None
        if self._bar is not None:
            self._bar.close()
            self._bar = None
        if plot and self.path.exists():
            png = plot_curves(self.path, self.output_dir / CURVES_FILE)
        return png

    def __enter__(self) -> MetricsLogger:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def plot_curves(metrics_path: str | Path, png_path: str | Path) -> Path:
    """Reward (first of REWARD_KEYS present) and every `throughput/*` metric against step, as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = read_metrics(metrics_path)

    def series(key: str) -> tuple[list[int], list[float]]:
        pts = [(r["step"], r[key]) for r in rows
               if isinstance(r.get(key), (int, float)) and not isinstance(r.get(key), bool)
               and math.isfinite(r[key])]
        return [p[0] for p in pts], [p[1] for p in pts]

    reward_key = next((k for k in REWARD_KEYS if any(k in r for r in rows)), None)
    tput_keys = sorted({k for r in rows for k in r if k.startswith(THROUGHPUT_PREFIX)})
    fig, (ax_r, ax_t) = plt.subplots(2, 1, figsize=(8, 7), sharex=True)
    if reward_key is not None:
        ax_r.plot(*series(reward_key), marker=".", label=reward_key)
        if any("val/em" in r for r in rows):  # held-out EM of the in-training validation
            ax_r.plot(*series("val/em"), marker="o", label="val/em (held-out)")
        ax_r.legend(loc="best")
    else:
        ax_r.text(0.5, 0.5, "no reward metric logged", ha="center", va="center", transform=ax_r.transAxes)
    ax_r.set_ylabel("reward")
    ax_r.set_title("training curves")
    for k in tput_keys:
        ax_t.plot(*series(k), marker=".", label=k[len(THROUGHPUT_PREFIX):])
    if tput_keys:
        ax_t.legend(loc="best", fontsize="small")
    else:
        ax_t.text(0.5, 0.5, "no throughput metric logged", ha="center", va="center", transform=ax_t.transAxes)
    ax_t.set_ylabel("tokens / s")
    ax_t.set_xlabel("step")
    fig.tight_layout()
    png_path = Path(png_path)
    png_path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(png_path, dpi=100)
    plt.close(fig)
    return png_path
