"""Config loading: YAML typing, dotted overrides, one error listing every problem, round trip."""

from __future__ import annotations

from pathlib import Path

import pytest

from rexrag_fast.train.config import (
    Config,
    ConfigError,
    apply_overrides,
    config_from_dict,
    dump_config,
    load_config,
    parse_scalar,
    save_config,
)

CONFIGS = Path(__file__).resolve().parents[1] / "configs"


@pytest.mark.parametrize("name", ["tiny_cpu.yaml", "qwen2.5-3b.yaml"])
def test_shipped_configs_load(name: str) -> None:
    cfg = load_config(CONFIGS / name)
    assert isinstance(cfg, Config)


def test_reference_hyperparameters() -> None:
    cfg = load_config(CONFIGS / "qwen2.5-3b.yaml")
    assert cfg.actor.lr == 1e-6
    assert cfg.data.train_batch_size == 512 and cfg.rollout.n_agent == 5
    assert cfg.data.max_response_length == 500 and cfg.rollout.max_turns == 5
    assert cfg.algorithm.kl_type == "low_var_kl" and cfg.algorithm.kl_coef == 0.001
    assert cfg.algorithm.clip_ratio_low == 0.2 and cfg.algorithm.clip_ratio_high == 0.2
    assert cfg.deepspeed.zero_stage == 3 and cfg.deepspeed.precision == "bf16"


@pytest.mark.parametrize(
    ("text", "expected"),
    [("10", 10), ("1e-6", 1e-6), ("-2.5E3", -2500.0), ("true", True), ("null", None), ("rexrag", "rexrag"),
     ("[a, b]", ["a", "b"]), ("'10'", "10"), ("", ""), ("1.0", 1.0), (".inf", float("inf"))],
)
def test_parse_scalar_yaml_typing(text: str, expected: object) -> None:
    got = parse_scalar(text)
    assert got == expected and type(got) is type(expected)


def test_overrides_required_keys() -> None:
    cfg = load_config(
        CONFIGS / "tiny_cpu.yaml",
        ["trainer.max_steps=7", "trainer.output_dir=/tmp/x", "trainer.seed=9", "algorithm.name=grpo",
         "actor.lr=3e-5", "data.train_files=[a.parquet, b.parquet]", "algorithm.rexrag.keep_ratio=0.1"],
    )
    assert cfg.trainer.max_steps == 7 and cfg.trainer.output_dir == "/tmp/x" and cfg.trainer.seed == 9
    assert cfg.algorithm.name == "grpo" and cfg.actor.lr == 3e-5
    assert cfg.data.train_files == ["a.parquet", "b.parquet"]
    assert cfg.algorithm.rexrag.keep_ratio == 0.1


def test_int_accepted_for_float_but_not_bool_for_int() -> None:
    assert config_from_dict({"actor": {"lr": 1}}).actor.lr == 1.0
    with pytest.raises(ConfigError, match=r"trainer\.max_steps: expected an integer, got True"):
        config_from_dict({"trainer": {"max_steps": True}})


def test_one_error_lists_every_problem() -> None:
    raw = {
        "actor": {"lr": "fast", "ppo_epochs": 0},
        "algorithm": {"name": "ppo", "rexrag": {"keep_ratio": 1.5, "bogus": 1}},
        "trainer": {"max_stpes": 3},
        "rollout": {"top_p": 2.0},
        "data": {"train_files": 3},
        "nonsense": {},
    }
    with pytest.raises(ConfigError) as info:
        config_from_dict(raw, "test.yaml")
    err = info.value
    keys = sorted(p.split(":", 1)[0] for p in err.problems)
    assert keys == sorted([
        "actor.lr", "actor.ppo_epochs", "algorithm.name", "algorithm.rexrag.keep_ratio",
        "algorithm.rexrag.bogus", "trainer.max_stpes", "rollout.top_p", "data.train_files", "nonsense",
    ])
    text = str(err)
    assert text.startswith("9 problems in test.yaml:")
    assert "trainer.max_stpes: unknown key (known: " in text and "max_steps" in text
    assert "algorithm.name: expected one of ['grpo', 'rexrag'], got 'ppo'" in text


@pytest.mark.parametrize(
    ("override", "key"),
    [
        ("actor.ppo_mini_batch_size=3", "actor.ppo_mini_batch_size"),  # does not divide train_batch_size 4
        ("actor.max_tokens_per_micro_batch=100", "actor.max_tokens_per_micro_batch"),
        ("deepspeed.offload_param=true", None),  # fine at stage 3
        ("deepspeed.zero_stage=4", "deepspeed.zero_stage"),
        ("retriever.embedded=false", None),  # default url is valid
        ("rollout.n_agent=1", None),
        ("actor.ref_placement=none", "actor.ref_placement"),  # KL is on
        ("algorithm.clip_ratio_c=1.0", "algorithm.clip_ratio_c"),
        ("algorithm.rexrag.revision_prob=120", "algorithm.rexrag.revision_prob"),
    ],
)
def test_impossible_values(override: str, key: str | None) -> None:
    if key is None:
        load_config(CONFIGS / "tiny_cpu.yaml", [override])
        return
    with pytest.raises(ConfigError) as info:
        load_config(CONFIGS / "tiny_cpu.yaml", [override])
    assert [p.split(":", 1)[0] for p in info.value.problems] == [key]


def test_cross_field_offload_needs_stage3() -> None:
    with pytest.raises(ConfigError, match=r"deepspeed\.offload_param: needs deepspeed\.zero_stage 3, got 2"):
        load_config(CONFIGS / "tiny_cpu.yaml", ["deepspeed.zero_stage=2", "deepspeed.offload_param=true"])


def test_rloo_needs_groups() -> None:
    with pytest.raises(ConfigError, match=r"algorithm\.adv_estimator: rloo needs rollout\.n_agent >= 2"):
        load_config(CONFIGS / "tiny_cpu.yaml", ["algorithm.adv_estimator=rloo", "rollout.n_agent=1"])


@pytest.mark.parametrize("bad", ["no_equals", "=3", "a..b=1"])
def test_malformed_override(bad: str) -> None:
    with pytest.raises(ConfigError, match="expected dotted.key=value"):
        apply_overrides({}, [bad])


def test_override_into_scalar_is_reported() -> None:
    with pytest.raises(ConfigError, match=r"actor\.lr is not a section"):
        apply_overrides({"actor": {"lr": 1.0}}, ["actor.lr.x=2"])


def test_section_must_be_mapping() -> None:
    with pytest.raises(ConfigError, match=r"actor: expected a mapping of keys, got 3"):
        config_from_dict({"actor": 3})


def test_bad_yaml_and_missing_file(tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text("actor: [unclosed\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(bad)
    top = tmp_path / "list.yaml"
    top.write_text("- 1\n- 2\n")
    with pytest.raises(ConfigError, match="top level must be a mapping"):
        load_config(top)
    with pytest.raises(FileNotFoundError, match="config file not found"):
        load_config(tmp_path / "absent.yaml")


@pytest.mark.parametrize("name", ["tiny_cpu.yaml", "qwen2.5-3b.yaml"])
def test_saved_config_round_trips(tmp_path: Path, name: str) -> None:
    cfg = load_config(CONFIGS / name, ["actor.lr=2e-7", "trainer.seed=5"])
    path = save_config(cfg, tmp_path / "run" / "config.yaml")
    assert load_config(path) == cfg
    assert "lr: 2.0e-07" in dump_config(cfg)


def test_defaults_are_valid() -> None:
    assert load_config(None) == Config()
