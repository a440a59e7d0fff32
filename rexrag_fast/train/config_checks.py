"""What a config's values must satisfy before a run starts, and the files they name: ranges, finiteness,
contradictions between fields (`check_values`), data files and the output directory (`check_paths`), a
user's DeepSpeed JSON (`read_deepspeed_json`). Each problem is one 'dotted.key: problem' line.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from rexrag_fast.ops import core_algos
from rexrag_fast.train.config_yaml import plain_copy

if TYPE_CHECKING:
    from rexrag_fast.train.config import Config

INT64_MAX = 2**63 - 1  # every integer setting ends up in an int64 tensor or a C long somewhere
SEED_LIMIT = 2**32  # numpy.random.seed and RandomState take seeds in [0, 2**32)
INT32_MAX = 2**31 - 1  # cu_seqlens and token positions are int32: one micro-batch holds at most this many tokens
MAX_TRAJECTORIES_PER_STEP = 2**20  # train_batch_size x n_agent; the reference run has 2,560
QA_SUFFIXES = (".parquet", ".jsonl", ".json")  # what rexrag_fast.data.datasets.load_qa reads


def check_values(cfg: Config) -> list[str]:
    """Impossible values and contradictions between fields, as 'dotted.key: problem'."""
    p: list[str] = []

    def need(ok: bool, key: str, msg: str) -> None:
        if not ok:
            p.append(f"{key}: {msg}")

    d, r, rv, a, ac, ds, t = (
        cfg.data, cfg.retriever, cfg.rollout, cfg.algorithm, cfg.actor, cfg.deepspeed, cfg.trainer
    )
    need(bool(cfg.model.path), "model.path", "must not be empty")
    for key in ("train_batch_size", "val_batch_size"):
        n = getattr(d, key)
        need(n >= 1 and n * max(rv.n_agent, 1) <= MAX_TRAJECTORIES_PER_STEP, f"data.{key}",
             f"must be >= 1 and, times rollout.n_agent ({rv.n_agent}), at most {MAX_TRAJECTORIES_PER_STEP:,} "
             f"trajectories per step, got {n}")
    for key in ("max_prompt_length", "max_start_length", "max_response_length", "max_obs_length"):
        need(1 <= getattr(d, key) <= INT32_MAX, f"data.{key}", f"must be in [1, {INT32_MAX}], got {getattr(d, key)}")
    need(d.max_start_length <= d.max_prompt_length, "data.max_start_length",
         f"must be <= data.max_prompt_length ({d.max_prompt_length}), got {d.max_start_length}")
    need(r.embedded or r.url.startswith(("http://", "https://")), "retriever.url",
         f"must be an http(s) URL (or set retriever.embedded: true), got {r.url!r}")
    need(r.topk >= 1, "retriever.topk", f"must be >= 1, got {r.topk}")
    need(r.timeout_s > 0, "retriever.timeout_s", f"must be > 0, got {r.timeout_s}")
    need(1 <= rv.n_agent <= MAX_TRAJECTORIES_PER_STEP, "rollout.n_agent",
         f"must be in [1, {MAX_TRAJECTORIES_PER_STEP}], got {rv.n_agent}")
    need(rv.max_turns >= 1, "rollout.max_turns", f"must be >= 1, got {rv.max_turns}")
    need(rv.temperature > 0, "rollout.temperature", f"must be > 0, got {rv.temperature}")
    need(0 < rv.top_p <= 1, "rollout.top_p", f"must be in (0, 1], got {rv.top_p}")
    need(rv.top_k == -1 or rv.top_k >= 1, "rollout.top_k", f"must be -1 or >= 1, got {rv.top_k}")
    need(rv.kv_block_size >= 1, "rollout.kv_block_size", f"must be >= 1, got {rv.kv_block_size}")
    need(0 < rv.gpu_memory_utilization <= 1, "rollout.gpu_memory_utilization",
         f"must be in (0, 1], got {rv.gpu_memory_utilization}")
    estimators = core_algos.adv_estimator_names()
    need(a.adv_estimator in estimators, "algorithm.adv_estimator",
         f"expected one of {list(estimators)} (ops.core_algos.register_adv_est adds one), got {a.adv_estimator!r}")
    need(a.adv_estimator != "rloo" or rv.n_agent >= 2, "algorithm.adv_estimator",
         f"rloo needs rollout.n_agent >= 2, got {rv.n_agent}")
    need(a.norm_adv_eps > 0, "algorithm.norm_adv_eps", f"must be > 0, got {a.norm_adv_eps}")
    need(a.kl_coef >= 0, "algorithm.kl_coef", f"must be >= 0, got {a.kl_coef}")
    need(0 <= a.clip_ratio_low < 1, "algorithm.clip_ratio_low", f"must be in [0, 1), got {a.clip_ratio_low}")
    need(a.clip_ratio_high >= 0, "algorithm.clip_ratio_high", f"must be >= 0, got {a.clip_ratio_high}")
    need(a.clip_ratio_c is None or a.clip_ratio_c > 1, "algorithm.clip_ratio_c",
         f"must be > 1 (or null: no dual clip), got {a.clip_ratio_c}")
    need(a.log_ratio_clamp is None or a.log_ratio_clamp > 0, "algorithm.log_ratio_clamp",
         f"must be > 0 (or null: no clamp), got {a.log_ratio_clamp}")
    need(a.entropy_coeff >= 0, "algorithm.entropy_coeff", f"must be >= 0, got {a.entropy_coeff}")
    x = a.rexrag
    need(0 <= x.revision_prob <= 100, "algorithm.rexrag.revision_prob",
         f"must be a percentage in [0, 100], got {x.revision_prob}")
    need(0 <= x.keep_ratio <= 1, "algorithm.rexrag.keep_ratio", f"must be in [0, 1], got {x.keep_ratio}")
    need(0 < x.keep_ratio_ewm_alpha <= 1, "algorithm.rexrag.keep_ratio_ewm_alpha",
         f"must be in (0, 1], got {x.keep_ratio_ewm_alpha}")
    need(ac.lr > 0, "actor.lr", f"must be > 0, got {ac.lr}")
    need(ac.weight_decay >= 0, "actor.weight_decay", f"must be >= 0, got {ac.weight_decay}")
    need(len(ac.betas) == 2 and all(0 <= b < 1 for b in ac.betas), "actor.betas",
         f"must be two numbers in [0, 1), got {ac.betas}")
    need(0 <= ac.lr_warmup_steps_ratio <= 1, "actor.lr_warmup_steps_ratio",
         f"must be in [0, 1], got {ac.lr_warmup_steps_ratio}")
    need(ac.grad_clip > 0, "actor.grad_clip", f"must be > 0, got {ac.grad_clip}")
    need(ac.ppo_epochs >= 1, "actor.ppo_epochs", f"must be >= 1, got {ac.ppo_epochs}")
    need(ac.ppo_mini_batch_size >= 1, "actor.ppo_mini_batch_size", f"must be >= 1, got {ac.ppo_mini_batch_size}")
    rows = d.train_batch_size * rv.n_agent
    need(ac.ppo_mini_batch_size <= rows and rows % max(ac.ppo_mini_batch_size, 1) == 0, "actor.ppo_mini_batch_size",
         f"counts rows (trajectories) and must divide data.train_batch_size x rollout.n_agent ({rows}), "
         f"got {ac.ppo_mini_batch_size}")
    longest = d.max_prompt_length + d.max_response_length
    need(ac.max_tokens_per_micro_batch >= longest, "actor.max_tokens_per_micro_batch",
         f"must hold one whole trajectory (data.max_prompt_length + data.max_response_length = {longest}), "
         f"got {ac.max_tokens_per_micro_batch}")
    need(ac.max_tokens_per_micro_batch <= INT32_MAX, "actor.max_tokens_per_micro_batch",
         f"must be <= {INT32_MAX} (int32 token offsets), got {ac.max_tokens_per_micro_batch}")
    need(ac.max_nonfinite_updates >= 1, "actor.max_nonfinite_updates",
         f"must be >= 1, got {ac.max_nonfinite_updates}")
    need(not (a.use_kl_loss and ac.ref_placement == "none"), "actor.ref_placement",
         "is 'none' but algorithm.use_kl_loss is true: the KL term needs a reference model")
    need(ds.zero_stage in (0, 1, 2, 3), "deepspeed.zero_stage", f"must be 0, 1, 2 or 3, got {ds.zero_stage}")
    need(not ds.offload_optimizer or ds.zero_stage >= 1, "deepspeed.offload_optimizer",
         f"needs deepspeed.zero_stage >= 1, got {ds.zero_stage}")
    need(not ds.offload_param or ds.zero_stage == 3, "deepspeed.offload_param",
         f"needs deepspeed.zero_stage 3, got {ds.zero_stage}")
    need(t.max_steps >= 1, "trainer.max_steps", f"must be >= 1, got {t.max_steps}")
    need(bool(t.output_dir), "trainer.output_dir", "must not be empty")
    need(0 <= t.seed < SEED_LIMIT, "trainer.seed", f"must be in [0, 2**32 - 1], got {t.seed}")
    need(t.save_every >= 0, "trainer.save_every", f"must be >= 0, got {t.save_every}")
    need(t.keep_last >= 1, "trainer.keep_last", f"must be >= 1, got {t.keep_last}")
    need(t.log_every >= 1, "trainer.log_every", f"must be >= 1, got {t.log_every}")
    need(d.val_max_examples >= 0, "data.val_max_examples", f"must be >= 0 (0: all), got {d.val_max_examples}")
    need(t.test_freq >= -1, "trainer.test_freq", f"must be >= 1, or 0 / -1 for no validation, got {t.test_freq}")
    return p


LOGGER_BACKENDS = ("console", "tensorboard", "wandb", "mlflow")
RESUME_MODES = ("auto", "disable")
# DeepSpeed settings the actor drives itself (variable micro-batch counts, its own optimizer and schedule):
# a user's deepspeed.config_file may not set them.
DEEPSPEED_OWNED_KEYS = ("train_micro_batch_size_per_gpu", "gradient_accumulation_steps", "train_batch_size",
                        "optimizer", "scheduler")


def check_dropin_values(cfg: Config) -> list[str]:
    """Checks of the keys that verl / REX-RAG users bring (logger, resume_mode, epochs, deepspeed.config_file)."""
    p: list[str] = []
    t, ds = cfg.trainer, cfg.deepspeed
    for i, name in enumerate(t.logger):
        if name not in LOGGER_BACKENDS:
            p.append(f"trainer.logger[{i}]: expected one of {list(LOGGER_BACKENDS)}, got {name!r}")
    if t.resume_mode not in RESUME_MODES and not Path(t.resume_mode).is_dir():
        p.append(f"trainer.resume_mode: expected auto, disable or an existing checkpoint directory, got "
                 f"{t.resume_mode!r} (not a directory)")
    if t.total_epochs is not None and t.total_epochs < 1:
        p.append(f"trainer.total_epochs: must be >= 1 (or null), got {t.total_epochs}")
    if t.export_hf_every < 0:
        p.append(f"trainer.export_hf_every: must be >= 0, got {t.export_hf_every}")
    if ds.config_file is not None:
        try:
            read_deepspeed_json(ds.config_file)
        except ValueError as e:
            p.append(f"deepspeed.config_file: {e}")
    return p


def read_deepspeed_json(path: str | Path) -> dict[str, Any]:
    """A user's DeepSpeed JSON as a dict; ValueError naming the file when it is missing, not JSON, not an
    object, or sets a key the actor owns (DEEPSPEED_OWNED_KEYS)."""
    import json

    path = Path(path)
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        raise ValueError(f"{path} does not exist") from None
    except (OSError, json.JSONDecodeError) as e:
        raise ValueError(f"{path} is not readable JSON: {e}") from None
    if not isinstance(data, dict):
        raise ValueError(f"{path} must hold a JSON object, got {type(data).__name__}")
    owned = sorted(k for k in data if k in DEEPSPEED_OWNED_KEYS)
    if owned:
        raise ValueError(f"{path} sets {owned}, which the actor drives itself (micro-batches are packed per "
                         "step, the optimizer is torch AdamW with actor.lr / actor.lr_warmup_steps_ratio); "
                         "remove them")
    return data


def merge_deepspeed_config(generated: Mapping[str, Any], user: Mapping[str, Any]) -> dict[str, Any]:
    """`generated` with `user` merged over it: nested objects merged key by key, any other value replaced."""
    out = plain_copy(generated)
    for key, value in user.items():
        if isinstance(value, Mapping) and isinstance(out.get(key), dict):
            out[key] = merge_deepspeed_config(out[key], value)
        else:
            out[key] = plain_copy(value)
    return out


def _writable_dir_problem(path: Path) -> str | None:
    """Why a run could not create and write `path` (None when it can), found by writing a probe file into
    `path` or, when it does not exist yet, into its nearest existing ancestor (os.access is wrong for root
    and on some network file systems)."""
    probe_dir = path
    while not probe_dir.exists():
        if probe_dir.parent == probe_dir:
            return "no existing ancestor directory"
        probe_dir = probe_dir.parent
    if not probe_dir.is_dir():
        return f"{probe_dir} exists and is not a directory"
    try:
        with tempfile.NamedTemporaryFile(dir=probe_dir, prefix=".rexrag-write-probe-"):
            pass
    except OSError as e:
        return f"cannot write in {probe_dir} ({e.strerror or e})"
    return None


def check_paths(cfg: Config) -> list[str]:
    """File-system problems of a config about to be run, as 'dotted.key: problem': every data file must be
    a readable QA file (.parquet, .jsonl or .json) and trainer.output_dir creatable and writable."""
    p: list[str] = []
    for key in ("train_files", "val_files"):
        for i, name in enumerate(getattr(cfg.data, key)):
            f = Path(name)
            where = f"data.{key}[{i}]"
            if not f.is_file():
                p.append(f"{where}: no such file: {name!r}" if not f.exists() else f"{where}: {name!r} is not a file")
            elif f.suffix.lower() not in QA_SUFFIXES:
                p.append(f"{where}: expected a {', '.join(QA_SUFFIXES)} file, got {name!r}")
            elif not os.access(f, os.R_OK):
                p.append(f"{where}: {name!r} is not readable")
    if cfg.trainer.output_dir:
        why = _writable_dir_problem(Path(cfg.trainer.output_dir))
        if why:
            p.append(f"trainer.output_dir: {cfg.trainer.output_dir!r} cannot be written: {why}")
    return p
