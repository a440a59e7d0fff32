"""verl / Search-R1 / REX-RAG config keys -> ours: the one translation table, applied when a config loads.

A run script written for MiliLab/REX-RAG (verl's `main_ppo` with Search-R1's additions) sets keys such as
`actor_rollout_ref.actor.optim.lr=1e-6`, `trainer.save_freq=50`, `data.revision_prob=20`, `max_turns=5`.
Each such key (in a YAML file or a `key=value` override, Hydra's `+key=` / `++key=` / `~key` included) is
looked up in `VERL_KEYS` (exact keys) or `VERL_PREFIXES` (whole subtrees) and handled by its rule:

    Rename(target)        the same quantity under our name (`convert` maps verl's value when units differ)
    Fixed(values, why)    something we always do one way: accepted with that value, an error otherwise
    Ignored(why)          has no effect here by construction (e.g. critic.* under GRPO-family estimators)
    Unsupported(key, why) an error naming our nearest key and why there is no equivalent

Keys of our own schema pass through unchanged. A key that is neither ours nor in the table is an error
naming the nearest keys we know. Two sources setting one of our keys to different values (our key and its
verl name in one file) is an error too. docs/config_keys.md is `markdown_table()` (tests/test_config_keys.py
checks it is current).
"""

from __future__ import annotations

import dataclasses
import difflib
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from functools import lru_cache
from typing import Any, Union

from rexrag_fast.train.config import Config, ConfigError
from rexrag_fast.train.config_yaml import parse_scalar, plain_copy


@dataclass(frozen=True)
class Rename:
    target: str | tuple[str, ...]  # one of ours, or several set to the same value
    note: str = ""
    convert: Callable[[Any], Any] | None = None  # verl value -> ours


@dataclass(frozen=True)
class Fixed:
    accepted: tuple[Any, ...]
    why: str


@dataclass(frozen=True)
class Ignored:
    why: str


@dataclass(frozen=True)
class Unsupported:
    nearest: str
    why: str


@dataclass(frozen=True)
class Custom:
    """A key whose translation depends on its value: fn(value) -> [(our key, value)], ValueError if refused."""

    fn: Callable[[Any], list[tuple[str, Any]]]
    doc: str


Rule = Union[Rename, Fixed, Ignored, Unsupported, Custom]

A = "actor_rollout_ref.actor."
R = "actor_rollout_ref.rollout."
M = "actor_rollout_ref.model."
REF = "actor_rollout_ref.ref."
BUDGET = "actor.max_tokens_per_micro_batch"
PACKED = "micro-batches are packed under a token budget, not counted in sequences"


def _save_freq(v: Any) -> Any:
    return 0 if v == -1 else v  # verl: -1 = never; ours: 0 = only on signals and at the end


def _rollout_n(v: Any) -> list[tuple[str, Any]]:
    # Search-R1 / REX-RAG set rollout.n=1 and the group size in rollout.n_agent; plain verl GRPO puts the
    # group size in rollout.n.
    if v == 1:
        return []
    return [("rollout.n_agent", v)]


def _keep_last(v: Any) -> list[tuple[str, Any]]:
    if v is None:
        raise ValueError("keeping every checkpoint (null) is not supported; give a count")
    return [("trainer.keep_last", v)]


VERL_KEYS: dict[str, Rule] = {
    # ---------------------------------------------------------------- data
    "data.revision_prob": Rename("algorithm.rexrag.revision_prob", "percent, as REX-RAG"),
    "data.seed": Rename("trainer.seed", "ours also seeds sampling and probe draws"),
    "data.tokenizer": Rename("model.tokenizer_path"),
    "data.truncation": Fixed(("left",), "prompts longer than data.max_start_length are cut from the left "
                                        "(the question stays); there is no 'error' or 'right' mode"),
    "data.filter_overlong_prompts": Fixed((False,), "prompts are truncated, never filtered"),
    "data.prompt_key": Fixed(("prompt",), "Search-R1 parquet files are read by their 'prompt' column"),
    "data.return_raw_chat": Ignored("the chat template is applied by the agent loop"),
    "data.max_prompt_length_check": Ignored("no prompt filtering"),
    # ---------------------------------------------------------------- model
    M + "path": Rename("model.path"),
    M + "trust_remote_code": Rename("model.trust_remote_code"),
    M + "enable_gradient_checkpointing": Rename("deepspeed.gradient_checkpointing"),
    M + "use_remove_padding": Fixed((True,), "the actor always runs packed (varlen) sequences"),
    M + "external_lib": Unsupported("model.trust_remote_code", "architectures come from transformers; "
                                                               "the engine supports qwen2 and llama"),
    M + "override_config": Unsupported("model.path", "edit the model's config.json instead"),
    # ---------------------------------------------------------------- actor optimisation
    A + "optim.lr": Rename("actor.lr"),
    A + "optim.lr_warmup_steps_ratio": Rename("actor.lr_warmup_steps_ratio"),
    A + "optim.weight_decay": Rename("actor.weight_decay"),
    A + "optim.betas": Rename("actor.betas"),
    A + "optim.lr_warmup_steps": Fixed((-1, None), "warm-up is set by actor.lr_warmup_steps_ratio"),
    A + "optim.warmup_style": Fixed(("constant",), "constant learning rate after a linear warm-up"),
    A + "optim.lr_scheduler_type": Fixed(("constant",), "constant learning rate after a linear warm-up"),
    A + "optim.min_lr_ratio": Fixed((None, 0.0), "no decay schedule"),
    A + "grad_clip": Rename("actor.grad_clip"),
    A + "ppo_epochs": Rename("actor.ppo_epochs"),
    A + "shuffle": Rename("actor.shuffle"),
    A + "ppo_mini_batch_size": Rename("actor.ppo_mini_batch_size", "prompts, as verl"),
    A + "ppo_max_token_len_per_gpu": Rename(BUDGET, "one budget for update and log-prob passes"),
    A + "use_dynamic_bsz": Fixed((True,), PACKED),
    A + "ppo_micro_batch_size": Unsupported(BUDGET, PACKED),
    A + "ppo_micro_batch_size_per_gpu": Unsupported(BUDGET, PACKED),
    A + "ulysses_sequence_parallel_size": Fixed((1,), "no sequence parallelism"),
    A + "strategy": Unsupported("deepspeed.zero_stage", "the actor runs on DeepSpeed ZeRO, not FSDP/Megatron"),
    A + "fsdp_config.param_offload": Rename("deepspeed.offload_param"),
    A + "fsdp_config.optimizer_offload": Rename("deepspeed.offload_optimizer"),
    A + "fsdp_config.grad_offload": Fixed((False,), "gradients stay with ZeRO's partitions"),
    A + "state_masking": Fixed((True,), "retrieved <information> tokens are always masked out of the loss"),
    # ---------------------------------------------------------------- loss
    A + "clip_ratio": Rename(("algorithm.clip_ratio_low", "algorithm.clip_ratio_high"), "sets both"),
    A + "clip_ratio_low": Rename("algorithm.clip_ratio_low"),
    A + "clip_ratio_high": Rename("algorithm.clip_ratio_high"),
    A + "clip_ratio_c": Rename("algorithm.clip_ratio_c"),
    A + "loss_agg_mode": Rename("algorithm.loss_agg_mode"),
    A + "entropy_coeff": Rename("algorithm.entropy_coeff"),
    A + "use_kl_loss": Rename("algorithm.use_kl_loss"),
    A + "kl_loss_coef": Rename("algorithm.kl_coef"),
    A + "kl_loss_type": Rename("algorithm.kl_type"),
    A + "policy_loss.loss_mode": Fixed(("vanilla",), "PPO clip with dual clip (+ REX-RAG's correction when "
                                                     "algorithm.name is rexrag)"),
    "algorithm.norm_adv_by_std_in_grpo": Rename("algorithm.norm_adv_by_std"),
    "algorithm.use_kl_in_reward": Fixed((False,), "the KL is a loss term (algorithm.use_kl_loss)"),
    "algorithm.no_think_rl": Fixed((False,), "the agent always thinks before acting"),
    "algorithm.gamma": Unsupported("algorithm.adv_estimator", "outcome estimators only (no critic, no GAE)"),
    "algorithm.lam": Unsupported("algorithm.adv_estimator", "outcome estimators only (no critic, no GAE)"),
    "algorithm.kl_ctrl.type": Unsupported("algorithm.kl_coef", "no KL in the reward, so no KL controller"),
    "algorithm.kl_ctrl.kl_coef": Unsupported("algorithm.kl_coef", "no KL in the reward, so no KL controller"),
    # ---------------------------------------------------------------- reference and log-prob passes
    REF + "log_prob_max_token_len_per_gpu": Rename(BUDGET, "one budget for every pass"),
    R + "log_prob_max_token_len_per_gpu": Rename(BUDGET, "one budget for every pass"),
    REF + "log_prob_micro_batch_size": Unsupported(BUDGET, PACKED),
    REF + "log_prob_micro_batch_size_per_gpu": Unsupported(BUDGET, PACKED),
    R + "log_prob_micro_batch_size": Unsupported(BUDGET, PACKED),
    R + "log_prob_micro_batch_size_per_gpu": Unsupported(BUDGET, PACKED),
    REF + "log_prob_use_dynamic_bsz": Fixed((True,), PACKED),
    R + "log_prob_use_dynamic_bsz": Fixed((True,), PACKED),
    REF + "fsdp_config.param_offload": Unsupported("actor.ref_placement", "choose none | cpu | deepspeed"),
    # ---------------------------------------------------------------- rollout
    R + "n_agent": Rename("rollout.n_agent", "the GRPO group size (Search-R1)"),
    R + "n": Custom(_rollout_n, "1: accepted (Search-R1 puts the group size in n_agent); > 1: rollout.n_agent"),
    R + "temperature": Rename("rollout.temperature"),
    R + "top_p": Rename("rollout.top_p"),
    R + "top_k": Rename("rollout.top_k"),
    R + "gpu_memory_utilization": Rename("rollout.gpu_memory_utilization"),
    R + "enable_prefix_caching": Rename("rollout.use_prefix_cache"),
    R + "name": Ignored("rollouts always run on rexrag-fast's own engine (paged KV + radix prefix cache)"),
    R + "tensor_model_parallel_size": Fixed((1,), "the rollout engine runs one model copy per rank"),
    R + "max_turns": Rename("rollout.max_turns"),
    "max_turns": Rename("rollout.max_turns", "REX-RAG / Search-R1 top-level key"),
    "keep_ratio": Rename("algorithm.rexrag.keep_ratio", "REX-RAG top-level key"),
    "do_search": Fixed((True,), "the agent always has the search tool"),
    # ---------------------------------------------------------------- trainer
    "trainer.total_training_steps": Rename("trainer.max_steps"),
    "trainer.save_freq": Rename("trainer.save_every", "-1 (never) becomes 0", convert=_save_freq),
    "trainer.default_local_dir": Rename("trainer.output_dir"),
    "trainer.resume_from_path": Rename("trainer.resume_mode", "the checkpoint directory itself"),
    "trainer.max_actor_ckpt_to_keep": Custom(_keep_last, "trainer.keep_last (null, keep all, is refused)"),
    "trainer.default_hdfs_dir": Fixed((None,), "checkpoints go to trainer.output_dir only"),
    "trainer.critic_warmup": Fixed((0,), "no critic"),
    "trainer.val_before_train": Fixed((False,), "score checkpoints with `rexrag-fast eval`"),
    "trainer.validation_data_dir": Ignored("no validation generations are written inside the run"),
    "trainer.n_gpus_per_node": Ignored("the launcher (torchrun / deepspeed / srun) decides the world size"),
    "trainer.nnodes": Ignored("the launcher (torchrun / deepspeed / srun) decides the world size"),
    "trainer.balance_batch": Ignored("batches are balanced by the token-budget packer"),
    "reward_model.reward_manager": Ignored("the reward is exact match of <answer> (Search-R1's)"),
    "reward_model.enable": Fixed((False,), "the reward is exact match, no reward model"),
}

VERL_PREFIXES: dict[str, Rule] = {
    "critic.": Ignored("GRPO-family estimators use no critic"),
    R + "engine_kwargs.": Ignored("engine-specific settings of vLLM / SGLang"),
    "ray_init.": Ignored("no Ray: one process per GPU under torchrun / deepspeed / srun"),
    "custom_reward_function.": Unsupported("algorithm.name", "the reward is exact match of <answer>"),
}

VERL_SECTIONS = ("actor_rollout_ref", "critic", "reward_model", "custom_reward_function", "ray_init")


@lru_cache(maxsize=1)
def our_keys() -> frozenset[str]:
    """Every dotted leaf key of `Config` (e.g. 'algorithm.rexrag.keep_ratio')."""
    out: set[str] = set()

    def walk(cls: type, prefix: str) -> None:
        for f in dataclasses.fields(cls):
            default = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
            if dataclasses.is_dataclass(default):
                walk(type(default), prefix + f.name + ".")
            else:
                out.add(prefix + f.name)

    walk(Config, "")
    return frozenset(out)


def _our_sections() -> set[str]:
    return {k.split(".")[0] for k in our_keys()}


def _rule(key: str) -> Rule | None:
    if key in VERL_KEYS:
        return VERL_KEYS[key]
    return next((rule for prefix, rule in VERL_PREFIXES.items() if key.startswith(prefix)), None)


def _nearest(key: str) -> str:
    """Up to three of our keys (and table keys) closest to `key`, for error messages."""
    candidates = sorted(our_keys() | set(VERL_KEYS))
    last = {c: c.rsplit(".", 1)[-1] for c in candidates}
    close = difflib.get_close_matches(key.rsplit(".", 1)[-1], list(set(last.values())), n=3, cutoff=0.6)
    hits = [c for c in candidates if last[c] in close and c in our_keys()][:3]
    return ", ".join(hits) if hits else "see docs/config_keys.md"


def translate_entry(key: str, value: Any) -> tuple[list[tuple[str, Any]], str | None]:
    """Our (key, value) pairs for one dotted `key` (ours or verl's) and a note for Ignored keys.
    ValueError with a one-line reason (without the key) when the key is refused."""
    if key in our_keys() or any(k.startswith(key + ".") for k in our_keys()):  # a leaf or a whole section
        return [(key, value)], None
    rule = _rule(key)
    if rule is None:
        top = key.split(".")[0]
        if top in _our_sections() or top in VERL_SECTIONS:
            raise ValueError(f"unknown key (no such key of ours, no translation of a verl / REX-RAG key); "
                             f"nearest: {_nearest(key)}")
        return [(key, value)], None  # not ours: left for validation to report with the rest
    if isinstance(rule, Rename):
        v = rule.convert(value) if rule.convert else value
        targets = (rule.target,) if isinstance(rule.target, str) else rule.target
        return [(t, v) for t in targets], None
    if isinstance(rule, Fixed):
        if value not in rule.accepted or any(isinstance(value, bool) != isinstance(a, bool)
                                             for a in rule.accepted if a == value):
            allowed = " or ".join(repr(a) for a in rule.accepted)
            raise ValueError(f"only {allowed} is supported, got {value!r}: {rule.why}")
        return [], None
    if isinstance(rule, Ignored):
        return [], f"{key}: ignored ({rule.why})"
    if isinstance(rule, Unsupported):
        raise ValueError(f"not supported ({rule.why}); nearest key of ours: {rule.nearest}")
    return rule.fn(value), None


def flatten(raw: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """{'a': {'b': 1}} -> {'a.b': 1}; our leaf keys and non-mapping values stop the descent; an empty
    mapping stays a leaf."""
    out: dict[str, Any] = {}
    for k, v in raw.items():
        key = f"{prefix}{k}"
        if isinstance(v, Mapping) and v and key not in our_keys():
            out.update(flatten(v, key + "."))
        else:
            out[key] = v
    return out


def _set(tree: dict[str, Any], key: str, value: Any) -> None:
    parts = key.split(".")
    node = tree
    for part in parts[:-1]:
        child = node.get(part)
        if not isinstance(child, dict):
            child = node[part] = {}
        node = child
    node[parts[-1]] = value


def _delete(tree: dict[str, Any], key: str) -> None:
    parts = key.split(".")
    node: Any = tree
    for part in parts[:-1]:
        node = node.get(part) if isinstance(node, dict) else None
    if isinstance(node, dict):
        node.pop(parts[-1], None)


def translate_tree(raw: Mapping[str, Any], notes: list[str] | None = None, source: str | None = None,
                   problems: list[str] | None = None) -> dict[str, Any]:
    """`raw` (a config mapping in our keys, verl's or both) with every key in ours. Each refused key and
    each of our keys set twice to different values is a problem: appended to `problems` when given (the
    key is then left out), else raised as one ConfigError."""
    collect = problems is not None
    problems = problems if problems is not None else []
    out: dict[str, Any] = {}
    origin: dict[str, str] = {}
    for key, value in flatten(raw).items():
        try:
            pairs, note = translate_entry(key, value)
        except ValueError as e:
            problems.append(f"{key}: {e}")
            continue
        if note and notes is not None:
            notes.append(note)
        for target, v in pairs:
            if target in origin and _get(out, target) != v:
                problems.append(f"{key}: sets {target} = {v!r}, but {origin[target]} already set it to "
                                f"{_get(out, target)!r}")
                continue
            origin[target] = key
            _set(out, target, v)
    if problems and not collect:
        raise ConfigError(problems, source)
    return out


def _get(tree: Mapping[str, Any], key: str) -> Any:
    node: Any = tree
    for part in key.split("."):
        node = node[part]
    return node


def apply_overrides(tree: Mapping[str, Any], overrides: Sequence[str], notes: list[str] | None = None,
                    problems: list[str] | None = None) -> dict[str, Any]:
    """A copy of `tree` (already in our keys) with each override set after translating its key:
    `key=value`, Hydra's `+key=value` / `++key=value` (add or override: the same here, every key has a
    default) and `~key` (back to the default). A later override of the same key wins. Every malformed or
    refused override is a problem, appended to `problems` when given, else raised as one ConfigError."""
    out = plain_copy(tree)
    collect = problems is not None
    problems = problems if problems is not None else []
    for item in overrides:
        text = item.strip()
        delete = text.startswith("~")
        key, sep, value_text = text.lstrip("~+").partition("=")
        key = key.strip()
        if (not sep and not delete) or not key or any(not p for p in key.split(".")):
            problems.append(f"override {item!r}: expected dotted.key=value, +key=value or ~key")
            continue
        try:
            pairs, note = translate_entry(key, None if delete else parse_scalar(value_text.strip()))
        except ValueError as e:
            problems.append(f"override {item!r}: {key}: {e}")
            continue
        if note and notes is not None:
            notes.append(note)
        for target, v in pairs:
            if delete:
                _delete(out, target)
            elif not _settable(out, target):
                problems.append(f"override {item!r}: {target.rsplit('.', 1)[0]} is not a section")
            else:
                _set(out, target, v)
    if problems and not collect:
        raise ConfigError(problems, "the overrides")
    return out


def _settable(tree: Mapping[str, Any], key: str) -> bool:
    node: Any = tree
    for part in key.split(".")[:-1]:
        if not isinstance(node, Mapping):
            return False
        node = node.get(part)
        if node is None:
            return True
    return isinstance(node, Mapping)


def describe_rule(rule: Rule) -> tuple[str, str]:
    """(ours, note) cells of the docs table for one rule."""
    if isinstance(rule, Rename):
        target = rule.target if isinstance(rule.target, str) else " + ".join(rule.target)
        return f"`{target}`", rule.note
    if isinstance(rule, Fixed):
        return "(fixed)", f"only {' or '.join(repr(a) for a in rule.accepted)}: {rule.why}"
    if isinstance(rule, Ignored):
        return "(ignored)", rule.why
    if isinstance(rule, Unsupported):
        return "**error**", f"nearest: `{rule.nearest}`; {rule.why}"
    return "(by value)", rule.doc


def markdown_table() -> str:
    """The translation table as Markdown rows: verl / REX-RAG key | ours | note."""
    rows = ["| verl / Search-R1 / REX-RAG key | ours | note |", "|---|---|---|"]
    for key, rule in [*VERL_KEYS.items(), *((p + "*", r) for p, r in VERL_PREFIXES.items())]:
        ours, note = describe_rule(rule)
        rows.append(f"| `{key}` | {ours} | {note} |")
    return "\n".join(rows) + "\n"
