"""Config loading: YAML typing, dotted overrides, one error listing every problem, round trip."""

from __future__ import annotations

from pathlib import Path

import pytest
from file_helpers import assert_refused

from rexrag_fast.train.config import (
    Config,
    ConfigError,
    config_from_dict,
    dump_config,
    load_config,
    save_config,
)
from rexrag_fast.train.config_keys import apply_overrides
from rexrag_fast.train.config_yaml import parse_scalar

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
    with pytest.raises(ConfigError, match=r"actor\.lr\.x: unknown key"):
        apply_overrides({"actor": {"lr": 1.0}}, ["actor.lr.x=2"])


def test_section_must_be_mapping() -> None:
    with pytest.raises(ConfigError, match=r"actor: expected a mapping of keys, got 3"):
        config_from_dict({"actor": 3})


def test_bad_yaml_and_missing_file(tmp_path: Path) -> None:
    assert_refused(load_config, tmp_path / "bad.yaml", "actor: [unclosed\n", "not valid YAML", ConfigError)
    assert_refused(load_config, tmp_path / "list.yaml", "- 1\n- 2\n", "top level must be a mapping", ConfigError)
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


# ------------------------------------------------------------------- values that used to fail late


@pytest.mark.parametrize(
    "override",
    ["actor.lr=.inf", "rollout.temperature=.inf", "algorithm.norm_adv_eps=.inf", "algorithm.entropy_coeff=.inf",
     "algorithm.kl_coef=.inf", "algorithm.kl_coef=.nan", "retriever.timeout_s=-.inf", "actor.grad_clip=1e400"],
)
def test_non_finite_numbers_are_refused(override: str) -> None:
    key = override.split("=", 1)[0]
    with pytest.raises(ConfigError) as info:
        load_config(CONFIGS / "tiny_cpu.yaml", [override])
    assert [p.split(":", 1)[0] for p in info.value.problems] == [key]
    assert f"{key}: expected a finite number, got" in str(info.value)


@pytest.mark.parametrize(
    ("override", "key", "message"),
    [
        (f"trainer.seed={2**70}", "trainer.seed", "expected an integer within +-(2**63 - 1)"),
        (f"trainer.seed={2**32}", "trainer.seed", "must be in [0, 2**32 - 1]"),
        (f"trainer.max_steps={2**64}", "trainer.max_steps", "expected an integer within +-(2**63 - 1)"),
        ("data.train_batch_size=1000000000000", "data.train_batch_size", "trajectories per step"),
        ("actor.max_tokens_per_micro_batch=4294967296", "actor.max_tokens_per_micro_batch", "int32 token offsets"),
        ("actor.max_nonfinite_updates=0", "actor.max_nonfinite_updates", "must be >= 1"),
    ],
)
def test_out_of_range_values_are_refused(override: str, key: str, message: str) -> None:
    with pytest.raises(ConfigError) as info:
        load_config(CONFIGS / "tiny_cpu.yaml", [override])
    assert key in [p.split(":", 1)[0] for p in info.value.problems]
    assert message in str(info.value)


def test_limits_accept_their_edges() -> None:
    cfg = load_config(CONFIGS / "tiny_cpu.yaml", [f"trainer.seed={2**32 - 1}", "actor.max_nonfinite_updates=1"])
    assert cfg.trainer.seed == 2**32 - 1 and cfg.actor.max_nonfinite_updates == 1
    assert Config().actor.max_nonfinite_updates == 3


def _qa_file(path: Path) -> Path:
    path.write_text('{"id": "q1", "question": "who?", "golden_answers": ["a"]}\n')
    return path


def test_paths_checked_for_a_run(tmp_path: Path) -> None:
    blocker = tmp_path / "a_file"
    blocker.write_text("x")
    good = _qa_file(tmp_path / "train.jsonl")
    wrong_kind = tmp_path / "train.csv"
    wrong_kind.write_text("q,a\n")
    overrides = [f"data.train_files=[{good}, {tmp_path / 'absent.parquet'}]", f"data.val_files=[{wrong_kind}]",
                 f"trainer.output_dir={blocker / 'run'}"]
    cfg = load_config(CONFIGS / "tiny_cpu.yaml", overrides)  # reading a config does not touch the disk
    assert cfg.data.train_files[1].endswith("absent.parquet")
    with pytest.raises(ConfigError) as info:
        load_config(CONFIGS / "tiny_cpu.yaml", overrides, paths=True)
    problems = info.value.problems
    assert [p.split(":", 1)[0] for p in problems] == ["data.train_files[1]", "data.val_files[0]",
                                                      "trainer.output_dir"]
    assert "no such file" in problems[0] and "absent.parquet" in problems[0]
    assert "expected a .parquet, .jsonl, .json file" in problems[1]
    assert "exists and is not a directory" in problems[2]
    ok = load_config(CONFIGS / "tiny_cpu.yaml", [f"data.train_files=[{good}]",
                                                 f"trainer.output_dir={tmp_path / 'new' / 'run'}"], paths=True)
    assert ok.data.train_files == [str(good)]
    assert not (tmp_path / "new").exists()  # the probe writes in the nearest existing ancestor and removes it
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a_file", "train.csv", "train.jsonl"]


def test_train_command_refuses_late_failures_before_loading(tmp_path: Path,
                                                            capsys: pytest.CaptureFixture) -> None:
    from rexrag_fast.cli import main as cli_main

    blocker = tmp_path / "a_file"
    blocker.write_text("x")
    rc = cli_main(["train", "--config", str(CONFIGS / "tiny_cpu.yaml"),
                   f"data.train_files=[{tmp_path / 'nq_train.parquet'}]", f"trainer.output_dir={blocker / 'run'}",
                   f"trainer.seed={2**70}", "algorithm.kl_coef=.inf", "actor.lr=.inf", "rollout.temperature=.inf",
                   "algorithm.norm_adv_eps=.inf", "algorithm.entropy_coeff=.inf",
                   "data.train_batch_size=1000000000000"])
    err = capsys.readouterr().err
    assert rc == 2
    assert "9 problems" in err, err
    for key in ("data.train_files[0]: no such file", "trainer.output_dir:", "trainer.seed:", "algorithm.kl_coef:",
                "actor.lr:", "rollout.temperature:", "algorithm.norm_adv_eps:", "algorithm.entropy_coeff:",
                "data.train_batch_size:"):
        assert key in err, (key, err)
    assert "Traceback" not in err


def _alias_bomb(levels: int) -> str:
    """YAML whose each anchor level holds ten aliases of the previous one: 10**levels leaves."""
    lines = ['a0: &a0 ["x"]']
    for i in range(1, levels + 1):
        lines.append(f"a{i}: &a{i} [" + ", ".join([f"*a{i - 1}"] * 10) + "]")
    return "\n".join(lines) + "\n"


def test_yaml_alias_expansion_is_bounded(tmp_path: Path) -> None:
    bomb = tmp_path / "bomb.yaml"
    bomb.write_text(_alias_bomb(6))
    assert bomb.stat().st_size < 600
    with pytest.raises(ConfigError, match="aliases expand to more than 100,000 nodes"):
        load_config(bomb)
    assert_refused(load_config, tmp_path / "recursive.yaml", "trainer: &t {max_steps: 3, self: *t}\n",
                   "aliases expand", ConfigError)
    # Ordinary anchors stay usable.
    shared = tmp_path / "shared.yaml"
    shared.write_text("data: {train_files: &files [a.jsonl, b.jsonl], val_files: *files}\n")
    cfg = load_config(shared)
    assert cfg.data.train_files == cfg.data.val_files == ["a.jsonl", "b.jsonl"]
