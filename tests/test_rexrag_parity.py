"""Loop-level semantics shared with the REX-RAG reference: optimizer steps per training step, one global
probe top-K over all ranks, the kept probes' source-group reward, and a user prompt pool read from Python
source without running it. Expectations are worked by hand in each test."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from rexrag_fast.agent.trajectory import Trajectory
from rexrag_fast.rexrag.prompts import load_prompt_pool
from rexrag_fast.train.packing import optimizer_steps_per_epoch
from rexrag_fast.train.rexrag_stage import _source_group_rewards, probes_kept_per_rank
from rexrag_fast.train.step_batch import StepBatch

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize(("rows", "mini", "groups", "steps"), [
    (512 * 5, 256, 64, 10),  # the reference run: 2,560 rows / 256 (64 groups on each of 8 ranks)
    (512 * 5 + 40, 256, 64, 11),  # 40 kept probes: their share, rounded up
    (8, 4, 2, 2),
    (9, 4, 2, 2),  # capped: mini-batches of whole groups, 2 groups on the smallest rank
    (32, 32, 8, 1),
])
def test_optimizer_steps_count_rows_like_the_reference(rows, mini, groups, steps):
    assert optimizer_steps_per_epoch(rows, mini, groups) == steps


def test_optimizer_steps_reject_bad_counts():
    with pytest.raises(ValueError, match="mini_batch_rows"):
        optimizer_steps_per_epoch(8, 0, 2)


def test_probe_budget_is_one_top_k_over_all_ranks():
    # rank 0's probes are far more plausible: the global top-4 holds all of them, none of rank 1's
    assert probes_kept_per_rank([[-0.1, -0.2, -0.3], [-5.0, -6.0]], 4) == [3, 1]
    assert probes_kept_per_rank([[-0.1, -0.2, -0.3, -0.4], [-5.0, -6.0]], 4) == [4, 0]
    assert probes_kept_per_rank([[-3.0], [-1.0, -2.0], []], 2) == [0, 2, 0]
    # ties go to the lower rank, then the earlier probe: the order every rank's local stable sort agrees with
    assert probes_kept_per_rank([[-1.0, -1.0], [-1.0]], 2) == [2, 0]
    assert probes_kept_per_rank([[-1.0], [-1.0]], 1) == [1, 0]
    assert probes_kept_per_rank([[-1.0], [-2.0]], 0) == [0, 0]
    assert probes_kept_per_rank([[-1.0], [-2.0]], 10) == [1, 1]
    with pytest.raises(ValueError, match="NaN"):
        probes_kept_per_rank([[float("nan")]], 1)


def test_two_ranks_keep_the_global_top_k(tmp_path: Path):
    from tests.dist_helpers import run_torchrun

    run_torchrun([str(ROOT / "tests" / "dist_scripts" / "global_probe_topk.py"), "--out", str(tmp_path)],
                 ROOT, timeout_s=300)
    kept = [json.loads((tmp_path / f"rank{r}.json").read_text())["kept"] for r in (0, 1)]
    # originals 0..2 always; rank 0's probes by score (-0.1 @4, -0.2 @6, -0.3 @3, -0.4 @8); rank 1 none
    assert kept[0] == [0, 1, 2, 4, 6, 3, 8]
    assert kept[1] == [0, 1, 2]


def test_source_group_reward_is_the_mean_of_the_originals_of_the_group():
    trajs = [Trajectory.from_prompt([1, 2]) for _ in range(6)]
    batch = StepBatch(trajs=trajs, golds=[["a"]] * 6, rewards=[1.0, 0.0, 0.0, 0.0, 1.0, 0.0],
                      group_ids=[7, 7, 9, 9, 7, 9], is_probe=[False, False, False, False, True, True])
    assert _source_group_rewards(batch) == [0.5, 0.5, 0.0, 0.0, 0.5, 0.0]


def test_prompt_pool_from_python_source_is_parsed_not_run(tmp_path: Path):
    marker = tmp_path / "ran"
    f = tmp_path / "pool.py"
    f.write_text(f"import pathlib\npathlib.Path({str(marker)!r}).write_text('x')\n"
                 "OWN_POOL = [\n    '<think> First own probe.',\n    '<think> Second own probe.',\n]\n")
    assert load_prompt_pool(f) == ("<think> First own probe.", "<think> Second own probe.")
    assert not marker.exists()
    f.write_text("POOL = [open('x').read()]\n")
    with pytest.raises(ValueError, match="literal"):
        load_prompt_pool(f)
    f.write_text("x = 1\n")
    with pytest.raises(ValueError, match="no top-level list"):
        load_prompt_pool(f)


def test_reference_settings_load_from_the_rexrag_configs(tmp_path: Path):
    from rexrag_fast.train.config import load_config
    from rexrag_fast.train.rollout import agent_config

    for name in ("tiny_cpu.yaml", "demo_cpu.yaml", "qwen2.5-3b.yaml"):
        cfg = load_config(ROOT / "configs" / name)
        a = cfg.algorithm
        assert (a.name, a.clip_ratio_c, a.log_ratio_clamp, cfg.rollout.force_answer) == ("rexrag", None, None, False)
    cfg = load_config(ROOT / "configs" / "qwen2.5-3b.yaml")
    rows = cfg.data.train_batch_size * cfg.rollout.n_agent
    assert optimizer_steps_per_epoch(rows, cfg.actor.ppo_mini_batch_size, 64) == 10  # 2,560 / 256
    message = tmp_path / "invalid.txt"
    message.write_text("\nOwn words: use <search> or <answer>.\n", encoding="utf-8")
    cfg = load_config(ROOT / "configs" / "tiny_cpu.yaml",
                      [f"rollout.invalid_action_message={message}", "rollout.force_answer=true"])
    agent = agent_config(cfg, seed=None)
    assert agent.invalid_action_message == "\nOwn words: use <search> or <answer>.\n" and agent.force_answer
    with pytest.raises(ValueError, match="cannot be read"):
        agent_config(load_config(ROOT / "configs" / "tiny_cpu.yaml",
                                 [f"rollout.invalid_action_message={tmp_path / 'missing.txt'}"]), seed=None)
