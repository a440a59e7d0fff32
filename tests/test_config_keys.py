"""verl / Search-R1 / REX-RAG keys accepted through the one translation table (`train/config_keys.py`),
`rexrag-fast train --print-config`, and a user's DeepSpeed JSON merged over the generated one.

The REX-RAG overrides below are MiliLab/REX-RAG's scripts/search-r1-sgl/run_grpo_sglang_fsdp.sh, verbatim
except for the keys listed in UNSUPPORTED_IN_SCRIPT (each refused with our nearest key).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from rexrag_fast.cli import main as cli_main
from rexrag_fast.train import config_keys
from rexrag_fast.train.config import ConfigError, config_to_dict, load_config

ROOT = Path(__file__).resolve().parents[1]
TINY_CPU = ROOT / "configs" / "tiny_cpu.yaml"

REXRAG_SCRIPT_OVERRIDES = [
    "algorithm.adv_estimator=grpo",
    "data.train_files=['/workspace/rex-rag/dataset/train.parquet']",
    "data.val_files=['/workspace/rex-rag/dataset/test.parquet']",
    "data.train_batch_size=512", "data.val_batch_size=512", "data.max_prompt_length=4096",
    "data.max_response_length=500", "data.max_start_length=2048", "data.max_obs_length=500",
    "data.revision_prob=20", "data.filter_overlong_prompts=false", "data.seed=20020717",
    "actor_rollout_ref.model.path=tiny-qwen2",
    "actor_rollout_ref.actor.optim.lr=1e-6", "actor_rollout_ref.actor.optim.lr_warmup_steps_ratio=0.285",
    "actor_rollout_ref.model.use_remove_padding=True", "actor_rollout_ref.model.enable_gradient_checkpointing=True",
    "actor_rollout_ref.actor.ppo_mini_batch_size=256", "actor_rollout_ref.actor.use_dynamic_bsz=true",
    "actor_rollout_ref.actor.ppo_max_token_len_per_gpu=24000",
    "actor_rollout_ref.actor.fsdp_config.param_offload=False",
    "actor_rollout_ref.actor.fsdp_config.optimizer_offload=False",
    "actor_rollout_ref.actor.use_kl_loss=true", "actor_rollout_ref.actor.kl_loss_coef=0.001",
    "actor_rollout_ref.actor.kl_loss_type=low_var_kl", "actor_rollout_ref.actor.entropy_coeff=0",
    "actor_rollout_ref.actor.state_masking=true", "actor_rollout_ref.rollout.tensor_model_parallel_size=1",
    "actor_rollout_ref.rollout.name=sglang", "actor_rollout_ref.rollout.gpu_memory_utilization=0.8",
    "actor_rollout_ref.rollout.log_prob_max_token_len_per_gpu=24000",
    "actor_rollout_ref.rollout.engine_kwargs.sglang.attention_backend=flashinfer",
    "actor_rollout_ref.rollout.n=1", "actor_rollout_ref.rollout.n_agent=5",
    "critic.optim.lr=1e-5", "critic.model.use_remove_padding=True", "critic.model.path=/models/Qwen2.5-3B",
    "algorithm.use_kl_in_reward=False", "algorithm.no_think_rl=false", "trainer.critic_warmup=0",
    "trainer.logger=['console','tensorboard']", "trainer.project_name=REX-RAG-Experiment-Collection",
    "trainer.experiment_name=qwen2.5-3b-Full_Tech-train", "trainer.n_gpus_per_node=8",
    "trainer.val_before_train=false", "trainer.nnodes=1", "trainer.save_freq=50",
    "trainer.total_epochs=30", "trainer.total_training_steps=1005",
    "trainer.default_local_dir=verl_checkpoints/qwen2.5-3b", "trainer.validation_data_dir=verl_checkpoints/val",
    "trainer.resume_mode=auto", "trainer.test_freq=150", "reward_model.reward_manager=reward_manager",
    "max_turns=5", "keep_ratio=0.08", "do_search=true",
    "retriever.url=http://127.0.0.1:8000/retrieve", "retriever.topk=3",
]
UNSUPPORTED_IN_SCRIPT = {  # key=value -> what the error names
    "data.truncation='error'": "data.max_start_length",
}


def test_rexrag_script_overrides_translate_to_our_keys() -> None:
    notes: list[str] = []
    cfg = load_config(TINY_CPU, REXRAG_SCRIPT_OVERRIDES, notes=notes)
    assert cfg.model.path == "tiny-qwen2"
    assert cfg.actor.lr == 1e-6 and cfg.actor.lr_warmup_steps_ratio == 0.285
    assert cfg.actor.ppo_mini_batch_size == 256 and cfg.actor.max_tokens_per_micro_batch == 24000
    assert cfg.algorithm.kl_coef == 0.001 and cfg.algorithm.kl_type == "low_var_kl" and cfg.algorithm.use_kl_loss
    assert cfg.algorithm.entropy_coeff == 0.0
    assert cfg.algorithm.rexrag.revision_prob == 20.0 and cfg.algorithm.rexrag.keep_ratio == 0.08
    assert cfg.rollout.n_agent == 5 and cfg.rollout.max_turns == 5 and cfg.rollout.gpu_memory_utilization == 0.8
    assert cfg.deepspeed.gradient_checkpointing and not cfg.deepspeed.offload_param
    assert cfg.trainer.max_steps == 1005 and cfg.trainer.total_epochs == 30 and cfg.trainer.save_every == 50
    assert cfg.trainer.output_dir == "verl_checkpoints/qwen2.5-3b" and cfg.trainer.resume_mode == "auto"
    assert cfg.trainer.logger == ["console", "tensorboard"] and cfg.trainer.test_freq == 150
    assert cfg.trainer.project_name == "REX-RAG-Experiment-Collection"
    assert cfg.trainer.seed == 20020717 and cfg.data.train_batch_size == 512
    assert not cfg.retriever.embedded or cfg.retriever.url == "http://127.0.0.1:8000/retrieve"
    assert any(n.startswith("actor_rollout_ref.rollout.name: ignored") for n in notes)
    assert any(n.startswith("critic.optim.lr: ignored") for n in notes)


@pytest.mark.parametrize("override, nearest", sorted(UNSUPPORTED_IN_SCRIPT.items()))
def test_unsupported_verl_key_names_our_nearest(override: str, nearest: str) -> None:
    with pytest.raises(ConfigError) as info:
        load_config(TINY_CPU, [*REXRAG_SCRIPT_OVERRIDES, override])
    msg = str(info.value)
    assert "1 problem" in msg and override.split("=")[0] in msg and nearest in msg


def test_refusals_name_the_key_and_the_way_out() -> None:
    with pytest.raises(ConfigError) as info:
        load_config(TINY_CPU, ["actor_rollout_ref.actor.ppo_micro_batch_size_per_gpu=4",
                               "actor_rollout_ref.model.use_remove_padding=false",
                               "actor_rollout_ref.actor.optim.lrr=1e-6", "trainer.logger=[console,neptune]"])
    msg = str(info.value)
    assert "4 problems" in msg, msg
    assert "ppo_micro_batch_size_per_gpu: not supported" in msg and "actor.max_tokens_per_micro_batch" in msg
    assert "use_remove_padding: only True is supported, got False" in msg
    assert "optim.lrr: unknown key" in msg and "actor.lr" in msg  # the nearest of our keys
    assert "trainer.logger[1]: expected one of" in msg


def test_verl_yaml_file_and_conflicts(tmp_path: Path) -> None:
    verl_yaml = tmp_path / "verl.yaml"
    verl_yaml.write_text(yaml.safe_dump({
        "actor_rollout_ref": {"model": {"path": "tiny-qwen2"},
                              "actor": {"optim": {"lr": 3e-6}, "clip_ratio": 0.28, "ppo_mini_batch_size": 2},
                              "rollout": {"n": 4}},
        "data": {"train_batch_size": 4}, "retriever": {"url": "http://h:1/retrieve"},
        "trainer": {"save_freq": -1, "max_actor_ckpt_to_keep": 5},
    }))
    cfg = load_config(verl_yaml)
    assert cfg.actor.lr == 3e-6 and cfg.algorithm.clip_ratio_low == cfg.algorithm.clip_ratio_high == 0.28
    assert cfg.rollout.n_agent == 4  # plain verl GRPO: the group size in rollout.n
    assert cfg.trainer.save_every == 0 and cfg.trainer.keep_last == 5  # -1 (never) is our 0
    # An override of the verl key wins over the file; Hydra's + and ~ prefixes work.
    cfg = load_config(verl_yaml, ["+actor_rollout_ref.actor.optim.lr=1e-5", "~trainer.save_freq"])
    assert cfg.actor.lr == 1e-5 and cfg.trainer.save_every == 50
    # Our key and its verl name in one file, with different values: an error naming both.
    both = tmp_path / "both.yaml"
    both.write_text(yaml.safe_dump({"actor": {"lr": 1e-6}, "actor_rollout_ref": {"actor": {"optim": {"lr": 2e-6}}}}))
    with pytest.raises(ConfigError, match=r"actor_rollout_ref.actor.optim.lr: sets actor.lr = 2e-06, but actor.lr"):
        load_config(both)


def test_our_own_configs_pass_through_unchanged() -> None:
    for path in sorted((ROOT / "configs").glob("*.yaml")):
        raw = yaml.safe_load(path.read_text())
        assert config_keys.translate_tree(raw) == raw, path


def test_docs_table_is_current() -> None:
    docs = (ROOT / "docs" / "config_keys.md").read_text()
    assert config_keys.markdown_table() in docs, "regenerate docs/config_keys.md from config_keys.markdown_table()"
    for target in {t for rule in config_keys.VERL_KEYS.values() if isinstance(rule, config_keys.Rename)
                   for t in ((rule.target,) if isinstance(rule.target, str) else rule.target)}:
        assert target in config_keys.our_keys(), target


def test_print_config_prints_the_resolved_config_and_loads_nothing(tmp_path: Path, capsys) -> None:
    out = tmp_path / "never"
    rc = cli_main(["--local_rank=0", "train", "--config", str(TINY_CPU), "--print-config",
                   "actor_rollout_ref.actor.optim.lr=2e-6", f"trainer.default_local_dir={out}",
                   "model.path=/no/such/model"])  # not checked: nothing is loaded
    printed = capsys.readouterr().out
    assert rc == 0
    resolved = yaml.safe_load(printed)
    assert resolved["actor"]["lr"] == 2e-6 and resolved["trainer"]["output_dir"] == str(out)
    cfg = load_config(TINY_CPU, ["actor.lr=2e-6", f"trainer.output_dir={out}", "model.path=/no/such/model"])
    assert resolved == config_to_dict(cfg)
    assert not out.exists()


def test_bad_model_path_fails_before_anything_heavy(tmp_path: Path, capsys) -> None:
    rc = cli_main(["train", "--config", str(TINY_CPU), "model.path=/no/such/model",
                   f"trainer.output_dir={tmp_path / 'run'}"])
    assert rc == 2
    assert "model.path must be one of" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()


def test_user_deepspeed_json_is_merged_over_the_generated_config(tmp_path: Path) -> None:
    import torch

    from rexrag_fast.train.actor import build_deepspeed_config

    user = tmp_path / "ds.json"
    user.write_text(json.dumps({"zero_optimization": {"stage3_prefetch_bucket_size": 12345, "overlap_comm": True},
                                "steps_per_print": 10, "comms_logger": {"enabled": True}}))
    cfg = load_config(TINY_CPU, [f"deepspeed.config_file={user}"])
    ds = build_deepspeed_config(cfg, torch.device("cpu"))
    assert ds["zero_optimization"]["stage"] == 3  # generated, kept
    assert ds["zero_optimization"]["stage3_prefetch_bucket_size"] == 12345  # yours, added
    assert ds["zero_optimization"]["overlap_comm"] is True  # yours win
    assert ds["steps_per_print"] == 10 and ds["comms_logger"] == {"enabled": True}
    assert ds["train_micro_batch_size_per_gpu"] == 1
    owned = tmp_path / "owned.json"
    owned.write_text(json.dumps({"train_micro_batch_size_per_gpu": 4, "optimizer": {"type": "Adam"}}))
    with pytest.raises(ConfigError, match=r"deepspeed.config_file: .*owned.json sets \['optimizer', "
                                          r"'train_micro_batch_size_per_gpu'\]"):
        load_config(TINY_CPU, [f"deepspeed.config_file={owned}"])
    with pytest.raises(ConfigError, match="deepspeed.config_file: .*missing.json does not exist"):
        load_config(TINY_CPU, [f"deepspeed.config_file={tmp_path / 'missing.json'}"])


def test_resume_mode_values(tmp_path: Path) -> None:
    assert load_config(TINY_CPU).trainer.resume_mode == "auto"  # verl's default
    assert load_config(TINY_CPU, ["trainer.resume_mode=disable"]).trainer.resume_mode == "disable"
    assert load_config(TINY_CPU, [f"trainer.resume_from_path={tmp_path}"]).trainer.resume_mode == str(tmp_path)
    with pytest.raises(ConfigError, match="trainer.resume_mode: expected auto, disable or an existing checkpoint"):
        load_config(TINY_CPU, [f"trainer.resume_mode={tmp_path / 'nope'}"])


def test_total_epochs_stops_at_the_first_limit() -> None:
    from rexrag_fast.train.config import resolve_max_steps

    cfg = load_config(TINY_CPU, ["trainer.total_epochs=2", "trainer.max_steps=100", "data.train_batch_size=4",
                                 "actor.ppo_mini_batch_size=2"])
    assert resolve_max_steps(cfg, num_examples=18) == 8  # 2 epochs x 18 // 4 steps (verl drops the last)
    assert resolve_max_steps(cfg, num_examples=1000) == 100
    cfg.trainer.total_epochs = None
    assert resolve_max_steps(cfg, num_examples=18) == 100
