"""The RL training loop (`rexrag_fast.train.trainer`) and `rexrag-fast train`.

In process: the data stream, mini-batch splitting, the agent limits, config errors and an unreachable
retriever through the CLI (both end before any model is loaded). Then REAL 2-process DeepSpeed ZeRO-3 runs
on the CPU (gloo) through torchrun, of a tiny random Qwen2 (SmolLM2 tokenizer) on the embedded world with
its in-process retriever: the `rexrag-fast train` command for two steps; slow: one REX-RAG step with probes
on answered originals (tests/dist_scripts/trainer_rexrag_step.py), an exact resume, and SIGTERM to one rank
followed by a resume that ends where the uninterrupted run ends.
"""

from __future__ import annotations

import json
import math
import os
import re
import shutil
import signal
import subprocess
import time
from pathlib import Path

import pytest
import torch
from dist_helpers import free_port, run_torchrun, torchrun_command, torchrun_env

from rexrag_fast.cli import main as cli_main
from rexrag_fast.retrieval.retriever import RetrieverUnavailableError, check_retriever
from rexrag_fast.train.config import load_config
from rexrag_fast.train.metrics import read_metrics
from rexrag_fast.train.packing import split_mini_batches
from rexrag_fast.train.rexrag_stage import derive_seed
from rexrag_fast.train.rollout import PromptStream, agent_config

ROOT = Path(__file__).resolve().parents[1]
TINY_CPU = ROOT / "configs" / "tiny_cpu.yaml"
REXRAG_STEP_SCRIPT = ROOT / "tests" / "dist_scripts" / "trainer_rexrag_step.py"
RUN_TIMEOUT_S = 900
SEED = 5
LR = 1e-3
WEIGHT_DECAY = 0.01  # ActorConfig default
# Small enough for a few seconds per step on a CPU: 4 questions x 2 rollouts, one search turn + the answer turn.
TINY_RUN = [
    "model.path=tiny-qwen2", f"trainer.seed={SEED}", "trainer.max_steps=2", "trainer.save_every=1",
    "data.train_batch_size=4", "actor.ppo_mini_batch_size=4", "rollout.n_agent=2", "rollout.max_turns=1",
    "data.max_prompt_length=512", "data.max_start_length=320", "data.max_response_length=16",
    "actor.max_tokens_per_micro_batch=1024", f"actor.lr={LR}", "algorithm.entropy_coeff=0.01",
    "trainer.tensorboard=false", "trainer.progress_bar=false",
]


# ------------------------------------------------------------------------------------ in process


def test_prompt_stream_is_a_function_of_the_position() -> None:
    stream = PromptStream(7, seed=3)
    whole = stream.take(0, 21)
    assert PromptStream(7, seed=3).take(5, 9) == whole[5:14]  # a resumed run continues the same order
    for epoch in range(3):
        assert sorted(whole[7 * epoch: 7 * epoch + 7]) == list(range(7))  # each epoch a permutation
    assert whole[:7] != whole[7:14] or whole[7:14] != whole[14:]
    assert PromptStream(7, seed=4).take(0, 21) != whole
    assert PromptStream(5, seed=3, shuffle=False).take(3, 4) == [3, 4, 0, 1]
    with pytest.raises(ValueError, match="num_examples"):
        PromptStream(0, seed=1)


def test_split_mini_batches_keeps_groups_together() -> None:
    # 5 groups of 2 originals, then probes of groups 11 and 13 appended after all originals.
    groups = [10, 10, 11, 11, 12, 12, 13, 13, 14, 14, 11, 13]
    minis = split_mini_batches(groups, 2)
    assert [sorted({groups[i] for i in m}) for m in minis] == [[10, 11, 12], [13, 14]]
    assert sorted(i for m in minis for i in m) == list(range(len(groups)))
    assert 10 in minis[0] and 11 in minis[1]  # the probes (indices 10, 11) sit with their groups
    assert split_mini_batches(groups, 1) == [[0, 1, 2, 3, 10, 4, 5, 6, 7, 11, 8, 9]]
    with pytest.raises(ValueError, match="num_mini_batches: expected 1..5"):
        split_mini_batches(groups, 6)


def test_derived_seeds_are_fixed_and_distinct() -> None:
    seeds = {derive_seed(1, step, rank, purpose) for step in range(4) for rank in range(3) for purpose in (1, 2, 3)}
    assert len(seeds) == 36 and all(0 <= s < 2**31 for s in seeds)
    assert derive_seed(1, 2, 3) == derive_seed(1, 2, 3)


def test_agent_limits_keep_trajectories_within_the_packing_budget() -> None:
    cfg = load_config(TINY_CPU)
    a = agent_config(cfg, seed=7)
    d = cfg.data
    assert a.max_response_tokens + d.max_start_length == d.max_prompt_length + d.max_response_length
    assert (a.max_turns, a.topk, a.max_obs_tokens, a.max_tokens_per_turn, a.seed) == (
        cfg.rollout.max_turns, cfg.retriever.topk, d.max_obs_length, d.max_response_length, 7)


def test_train_command_lists_every_config_problem(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    out = tmp_path / "run"
    rc = cli_main(["train", "--config", str(TINY_CPU), f"trainer.output_dir={out}", "trainer.max_stpes=3",
                   "algorithm.name=ppo", "actor.lr=fast"])
    err = capsys.readouterr().err
    assert rc == 2
    assert "3 problems" in err
    for key in ("trainer.max_stpes: unknown key", "algorithm.name: expected one of ['grpo', 'rexrag']",
                "actor.lr: expected a number"):
        assert key in err, err
    assert not out.exists()


def test_unreachable_retriever_fails_fast(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    url = f"http://127.0.0.1:{free_port()}/retrieve"  # nothing listens there
    with pytest.raises(RetrieverUnavailableError, match="retriever.url = .* is unreachable"):
        check_retriever(url, timeout_s=2.0)
    out = tmp_path / "run"
    rc = cli_main(["train", "--config", str(TINY_CPU), "retriever.embedded=false", f"retriever.url={url}",
                   f"trainer.output_dir={out}"])
    err = capsys.readouterr().err
    assert rc == 2
    assert f"retriever.url = {url} is unreachable" in err and "rexrag-fast serve" in err
    assert not out.exists()  # it stopped before building anything


# ----------------------------------------------------------------------------- 2-process ZeRO-3


def _torchrun(target: list[str], out: Path) -> subprocess.CompletedProcess:
    out.mkdir(parents=True, exist_ok=True)
    return run_torchrun(target, cwd=ROOT, timeout_s=RUN_TIMEOUT_S)


def _train(out: Path, *flags: str) -> subprocess.CompletedProcess:
    return _torchrun(["-m", "rexrag_fast.cli", "train", "--config", str(TINY_CPU), *flags,
                      f"trainer.output_dir={out}", *TINY_RUN], out)


@pytest.fixture(scope="module")
def two_step_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str]:
    """`rexrag-fast train` on 2 CPU ranks for 2 steps (checkpoint after each)."""
    out = tmp_path_factory.mktemp("train_loop")
    return out, _train(out).stdout


def _initial_weights() -> dict[str, torch.Tensor]:
    from rexrag_fast.engine.loaders import load_smollm2_tokenizer, tiny_model

    model = tiny_model("qwen2", vocab_size=len(load_smollm2_tokenizer()), seed=SEED, tie_word_embeddings=False)
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def test_two_process_training_run(two_step_run: tuple[Path, str]) -> None:
    out, stdout = two_step_run
    assert "finished at step 2" in stdout
    rows = read_metrics(out / "metrics.jsonl")
    assert [r["step"] for r in rows] == [1, 2]
    for r in rows:
        for key in ("actor/loss", "actor/pg_loss", "actor/kl", "actor/entropy", "actor/grad_norm",
                    "actor/pg_clipfrac", "reward/mean", "reward/em", "rexrag/alpha", "rexrag/probe_accuracy",
                    "rexrag/probes_made", "throughput/rollout_tokens_per_s", "throughput/update_tokens_per_s",
                    "throughput/train_tokens_per_s", "memory/peak_bytes"):
            assert isinstance(r[key], float) and math.isfinite(r[key]), (key, r.get(key))
        assert r["actor/grad_norm"] > 0 and r["actor/entropy"] > 0
        assert r["actor/optimizer_steps"] == 2.0  # 4 prompts x n_agent 2 = 8 rows / ppo_mini_batch_size 4
        assert r["batch/train_sequences"] == 8.0  # 4 prompts x n_agent 2 (a random model never answers: no probes)
        assert 0.0 <= r["reward/mean"] <= 1.0
        assert r["memory/peak_bytes"] > 0
        # Engine sampling log-probs vs the actor's: equal up to float noise when the engine runs the actor's
        # weights. At step 2 this holds only because step 1's update was synced into the engine (lr 1e-3
        # moves the policy by far more than this bound: step 2's KL to the initial weights is above it).
        assert r["rollout/logprob_abs_diff"] < 1e-3
    assert rows[1]["actor/kl"] > 1e-3
    # The exported model: every parameter moved by more than weight decay alone would move it.
    from safetensors.torch import load_file

    final = load_file(out / "final" / "model.safetensors")
    init = _initial_weights()
    assert final.keys() == init.keys()
    decay = (1 - LR * WEIGHT_DECAY) ** 4  # 2 steps x 2 optimizer steps
    for name, w in init.items():
        assert (final[name] - w * decay).abs().max() > 1e-4, f"{name} did not learn"
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step_000001", "step_000002"]
    state = json.loads((out / "checkpoints" / "step_000002" / "trainer_state.json").read_text())
    assert state["step"] == 2 and state["data_position"] == 8 and state["keep_ratio_ewm"] is not None
    saved = load_config(out / "config.yaml")
    assert saved == load_config(TINY_CPU, [f"trainer.output_dir={out}", *TINY_RUN])
    assert (out / "curves.png").stat().st_size > 0


@pytest.mark.slow
def test_rexrag_step_with_probes(tmp_path: Path) -> None:
    _torchrun([str(REXRAG_STEP_SCRIPT), "--out", str(tmp_path)], tmp_path)
    result = json.loads((tmp_path / "result.json").read_text())
    m, ranks = result["metrics"], result["ranks"]
    originals = sum(r["originals"] for r in ranks)
    probes = [p for r in ranks for p in r["probes"]]
    assert originals == 8 and len(probes) >= 1
    for r in ranks:
        for source, group, turns, status in r["probes"]:
            assert r["rewards"][source] == 0.0  # only wrong answers are dead ends
            assert r["groups"][source] == group  # a probe joins its source's group
            assert turns == 2 and status in ("answer", "max_turns", "length", "eos")
    # keep_ratio 1: the budget (8) holds every probe; err and alpha over both ranks.
    assert m["rexrag/probes_made"] == m["rexrag/probes_kept"] == len(probes)
    assert m["rexrag/alpha"] == pytest.approx(len(probes) / (originals + len(probes)))
    assert m["rexrag/error_rate"] == pytest.approx(0.5)  # one right, one wrong answer per question
    assert m["reward/mean"] == pytest.approx(0.5)
    assert m["batch/train_sequences"] == originals + len(probes)
    # ceil((8 + probes) rows / ppo_mini_batch_size 4) >= 3, capped at the 2 groups each rank holds
    assert m["actor/optimizer_steps"] == 2.0
    assert m["rexrag/dead_ends"] == 4.0  # the wrong answer of each of the 4 questions
    assert m["rexrag/kept_probe_source_group_reward"] == pytest.approx(0.5)  # one right, one wrong per group
    for key in ("actor/loss", "actor/pg_loss", "actor/is_weight_mean", "actor/kl", "actor/grad_norm"):
        assert math.isfinite(m[key]), key
    assert m["actor/pg_loss"] != 0.0  # rewards differ inside every group: a real policy gradient
    assert all(result["changed"].values())
    grpo = result["grpo"]
    assert grpo["batch/train_sequences"] == originals and not any(k.startswith("rexrag/") for k in grpo)
    assert grpo["reward/mean"] == pytest.approx(0.5) and math.isfinite(grpo["actor/loss"])
    assert grpo["actor/pg_loss"] != 0.0
    assert result["collectives_checked"] > 0  # every collective ran on distributed.comm_device()


@pytest.mark.slow
def test_resume_repeats_the_uninterrupted_run(two_step_run: tuple[Path, str], tmp_path: Path) -> None:
    full, _ = two_step_run
    run = tmp_path / "resumed"
    (run / "checkpoints").mkdir(parents=True)
    shutil.copytree(full / "checkpoints" / "step_000001", run / "checkpoints" / "step_000001")
    stdout = _train(run, "--resume").stdout
    assert "at step 1" in stdout and "finished at step 2" in stdout
    want = read_metrics(full / "metrics.jsonl")[1]
    got = read_metrics(run / "metrics.jsonl")
    assert [r["step"] for r in got] == [2]
    for key in ("actor/loss", "actor/grad_norm", "actor/kl", "actor/entropy", "reward/mean", "batch/train_tokens",
                "rollout/response_len_mean", "rexrag/keep_ratio"):
        assert got[0][key] == want[key], (key, got[0][key], want[key])
    from safetensors.torch import load_file

    a, b = load_file(full / "final" / "model.safetensors"), load_file(run / "final" / "model.safetensors")
    for name in a:
        assert torch.equal(a[name], b[name]), name


@pytest.mark.slow
def test_sigterm_saves_at_the_step_boundary_and_resume_matches(two_step_run: tuple[Path, str], tmp_path: Path) -> None:
    """SIGTERM to one rank during training: every rank stops after the same step with a checkpoint; the
    resumed run then ends with the uninterrupted run's metrics and weights."""
    full, _ = two_step_run
    run = tmp_path / "killed"
    run.mkdir()
    cmd = torchrun_command(["-m", "rexrag_fast.cli", "train", "--config", str(TINY_CPU), f"trainer.output_dir={run}",
                            *TINY_RUN, "trainer.max_steps=3", "trainer.save_every=0"])
    proc = subprocess.Popen(cmd, cwd=ROOT, env=torchrun_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)
    try:
        metrics = run / "metrics.jsonl"
        for _ in range(2 * RUN_TIMEOUT_S):  # poll until step 1 is logged (or the run dies)
            if proc.poll() is not None or (metrics.exists() and read_metrics(metrics)):
                break
            time.sleep(0.5)
        assert proc.poll() is None, f"the run ended before step 1 was logged:\n{proc.stderr.read()[-6000:]}"
        workers = Path(f"/proc/{proc.pid}/task/{proc.pid}/children").read_text().split()
        assert len(workers) == 2, workers
        os.kill(int(workers[-1]), signal.SIGTERM)  # rank 1 only: rank 0 learns of it through the all-reduce
        stdout, stderr = proc.communicate(timeout=RUN_TIMEOUT_S)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, stderr[-6000:]
    stopped = re.search(r"stopped by signal after step (\d+)", stdout)
    assert stopped, stdout[-3000:]
    k = int(stopped.group(1))
    assert k in (1, 2)
    assert [p.name for p in (run / "checkpoints").iterdir()] == [f"step_{k:06d}"]
    assert not (run / "final").exists()
    assert "finished at step 2" in _train(run, "--resume").stdout
    want, got = read_metrics(full / "metrics.jsonl"), read_metrics(run / "metrics.jsonl")
    assert [r["step"] for r in got] == [1, 2]
    for w, g in zip(want, got):
        for key in ("actor/loss", "actor/grad_norm", "actor/kl", "actor/entropy", "reward/mean",
                    "batch/train_tokens"):
            assert g[key] == w[key], (w["step"], key, g[key], w[key])
    from safetensors.torch import load_file

    a, b = load_file(full / "final" / "model.safetensors"), load_file(run / "final" / "model.safetensors")
    for name in a:
        assert torch.equal(a[name], b[name]), name
