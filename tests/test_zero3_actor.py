"""The ZeRO-3 actor: packed log-probs against per-sequence Hugging Face forwards (in process), then REAL
2-process DeepSpeed ZeRO-3 runs on the CPU (gloo) through torchrun: a few update steps, and a signal /
corrupt-checkpoint / resume chain that must reproduce an uninterrupted run exactly."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest
import torch
from dist_helpers import run_torchrun

from rexrag_fast.engine.loaders import tiny_model
from rexrag_fast.ops.causal_lm import next_token_labels
from rexrag_fast.testing import assert_close
from rexrag_fast.train.actor import (
    PolicyLogprobs,
    build_deepspeed_config,
    shift_to_tokens,
    warmup_lr,
)
from rexrag_fast.train.config import load_config
from rexrag_fast.train.metrics import read_metrics
from rexrag_fast.train.packing import pack_sequences

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "tests" / "dist_scripts" / "zero3_update.py"
RUN_TIMEOUT_S = 400


# ------------------------------------------------------------------------------ in-process pieces


def test_next_token_labels_and_shift() -> None:
    ids = torch.tensor([5, 6, 7, 8, 9])
    cu = torch.tensor([0, 3, 5], dtype=torch.int32)
    assert next_token_labels(ids, cu, ignore_index=-1).tolist() == [6, 7, -1, 9, -1]
    assert shift_to_tokens(torch.tensor([1.0, 2.0, 3.0, 4.0, 5.0]), cu).tolist() == [0.0, 1.0, 2.0, 0.0, 4.0]


def _tiny_qwen2(seed: int = 0) -> torch.nn.Module:
    return tiny_model("qwen2", vocab_size=80, seed=seed, hidden_size=32, intermediate_size=64,
                      max_position_embeddings=64, tie_word_embeddings=False)


@pytest.mark.parametrize("fused", [False, True])
@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_packed_logprobs_match_per_sequence_forward(fused: bool, temperature: float) -> None:
    model = _tiny_qwen2()
    g = torch.Generator().manual_seed(3)
    seqs = [torch.randint(0, 80, (n,), generator=g).tolist() for n in (5, 9, 1, 7)]
    batch = pack_sequences(seqs)
    module = PolicyLogprobs(model, fused=fused, temperature=temperature, compute_entropy=True)
    with torch.no_grad():
        lp, ent = module(batch.input_ids, batch.position_ids, batch.cu_seqlens)
    assert lp.shape == ent.shape == (batch.num_tokens,) and lp.dtype == torch.float32
    # Expected: each sequence alone through the HF model (no packing), logits / temperature.
    exp_lp, exp_ent = [], []
    with torch.no_grad():
        for s in seqs:
            logits = model(torch.tensor([s])).logits[0].double() / temperature
            logp = torch.log_softmax(logits, -1)
            picked = logp[:-1].gather(1, torch.tensor(s[1:])[:, None]).squeeze(1)
            exp_lp.append(torch.cat([torch.zeros(1, dtype=torch.float64), picked]))
            h = -(logp.exp() * logp).sum(-1)
            exp_ent.append(torch.cat([torch.zeros(1, dtype=torch.float64), h[:-1]]))
    assert_close(lp, torch.cat(exp_lp).float(), torch.float32, name="logprobs")
    assert_close(ent, torch.cat(exp_ent).float(), torch.float32, name="entropy")


def test_fused_and_eager_gradients_agree() -> None:
    model = _tiny_qwen2(1)
    batch = pack_sequences([[1, 2, 3, 4, 5, 6], [7, 8, 9], [10, 11, 12, 13]])
    grads = {}
    for fused in (False, True):
        model.zero_grad()
        lp, _ = PolicyLogprobs(model, fused=fused)(batch.input_ids, batch.position_ids, batch.cu_seqlens)
        lp.sum().backward()
        grads[fused] = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    assert grads[False].keys() == grads[True].keys() and len(grads[True]) > 0
    for name in grads[False]:
        assert_close(grads[True][name], grads[False][name], torch.float32, name=name)


def test_deepspeed_config_from_config() -> None:
    cfg = load_config(ROOT / "configs" / "qwen2.5-3b.yaml", ["deepspeed.offload_optimizer=true"])
    ds = build_deepspeed_config(cfg, torch.device("cuda", 0))
    assert ds["zero_optimization"]["stage"] == 3 and ds["bf16"]["enabled"] is True
    assert ds["zero_optimization"]["offload_optimizer"]["device"] == "cpu"
    assert ds["gradient_clipping"] == 1.0 and ds["gradient_accumulation_steps"] == 1
    cpu = build_deepspeed_config(load_config(ROOT / "configs" / "tiny_cpu.yaml", ["deepspeed.precision=auto"]),
                                 torch.device("cpu"))
    assert cpu["bf16"]["enabled"] is False and "offload_param" not in cpu["zero_optimization"]


def test_warmup_lr() -> None:
    assert warmup_lr(1e-6, 0, 0) == 1e-6
    assert warmup_lr(1e-6, 0, 10) == 0.0
    assert warmup_lr(1.0, 5, 10) == 0.5
    assert warmup_lr(1.0, 25, 10) == 1.0


# ----------------------------------------------------------------------------- 2-process ZeRO-3


def _torchrun(out: Path, *args: str, nproc: int = 2) -> subprocess.CompletedProcess:
    out.mkdir(parents=True, exist_ok=True)
    return run_torchrun([str(SCRIPT), "--out", str(out), *args], cwd=ROOT, timeout_s=RUN_TIMEOUT_S, nproc=nproc)


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """4 steps of ZeRO-3 on 2 CPU processes without interruption."""
    out = tmp_path_factory.mktemp("zero3_uninterrupted")
    proc = _torchrun(out, "--max-steps", "4")
    (out / "stdout.txt").write_text(proc.stdout)
    return out


def test_zero3_two_process_update(uninterrupted: Path) -> None:
    rows = read_metrics(uninterrupted / "metrics.jsonl")
    assert [r["step"] for r in rows] == [1, 2, 3, 4]
    for r in rows:
        for key in ("actor/loss", "actor/grad_norm", "actor/kl", "actor/pg_clipfrac", "actor/entropy",
                    "actor/ppo_kl", "actor/is_weight_mean", "actor/pg_loss", "actor/kl_loss", "reward/mean"):
            assert isinstance(r[key], float) and torch.isfinite(torch.tensor(r[key])), (key, r)
        assert r["actor/optimizer_steps"] == 4.0  # ppo_epochs 2 x 2 mini-batches
        assert r["actor/update_tokens"] == 2 * 171  # ppo_epochs x the 171 tokens of all 12 sequences (both ranks)
        assert r["throughput/update_tokens_per_s"] > 0 and r["memory/peak_bytes"] > 1 << 20
    assert rows[-1]["actor/kl"] > 0  # the policy moved away from the reference
    before = torch.load(uninterrupted / "weights_step0.pt")
    after = torch.load(uninterrupted / "weights_step4.pt")
    assert before.keys() == after.keys() and "model.embed_tokens.weight" in after and "lm_head.weight" in after
    for name in before:
        assert before[name].shape == after[name].shape
        assert not torch.equal(before[name], after[name]), f"{name} did not change"
    assert (uninterrupted / "curves.png").stat().st_size > 0
    # The gathered parameter stream loads into the rollout engine's weights (names and shapes line up).
    assert "weight sync ok" in (uninterrupted / "stdout.txt").read_text()


@pytest.mark.slow
def test_signal_corrupt_checkpoint_and_exact_resume(uninterrupted: Path, tmp_path: Path) -> None:
    run = tmp_path / "interrupted"
    # SIGTERM during step 3: the step finishes, a checkpoint is saved at its boundary, the run exits cleanly.
    first = _torchrun(run, "--max-steps", "4", "--save-every", "2", "--sigterm-at-step", "3")
    assert "stopped by signal after step 3" in first.stdout
    ckpts = run / "checkpoints"
    assert sorted(p.name for p in ckpts.iterdir()) == ["step_000002", "step_000003"]
    assert [r["step"] for r in read_metrics(run / "metrics.jsonl")] == [1, 2, 3]
    # A half-written engine shard in the newest checkpoint: detected, and the run falls back to step 2.
    shard = sorted((ckpts / "step_000003" / "deepspeed" / "ds").glob("*optim_states.pt"))[0]
    shard.write_bytes(shard.read_bytes()[: shard.stat().st_size // 2])
    resumed = _torchrun(run, "--max-steps", "4", "--save-every", "2", "--resume")
    assert "step_000003 is unusable" in resumed.stdout and "falling back to the previous one" in resumed.stdout
    assert "resumed from" in resumed.stdout and "step_000002 at step 2" in resumed.stdout
    # Steps 3 and 4 recomputed after the resume equal the uninterrupted run exactly (CPU, fp32).
    want = read_metrics(uninterrupted / "metrics.jsonl")
    got = read_metrics(run / "metrics.jsonl")
    assert [r["step"] for r in got] == [1, 2, 3, 4]
    for w, g in zip(want, got):
        for key in ("actor/loss", "actor/grad_norm", "actor/kl", "actor/entropy", "reward/mean"):
            assert g[key] == w[key], (w["step"], key, g[key], w[key])
    final_want = torch.load(uninterrupted / "weights_step4.pt")
    final_got = torch.load(run / "weights_step4.pt")
    for name in final_want:
        assert torch.equal(final_got[name], final_want[name]), name
    state = json.loads((ckpts / "step_000002" / "trainer_state.json").read_text())
    assert state["step"] == 2 and state["data_position"] == 12
    assert state["engine_config"]["zero_optimization"]["stage"] == 3


def _assert_runs_close(a: Path, b: Path, steps: int, what: str) -> None:
    rows_a, rows_b = read_metrics(a / "metrics.jsonl"), read_metrics(b / "metrics.jsonl")
    assert [r["step"] for r in rows_a] == [r["step"] for r in rows_b] == list(range(1, steps + 1))
    for ra, rb in zip(rows_a, rows_b):
        for key in ("actor/loss", "actor/grad_norm", "actor/kl", "actor/pg_clipfrac", "actor/entropy"):
            assert rb[key] == pytest.approx(ra[key], rel=1e-4, abs=1e-6), (what, ra["step"], key)
    wa, wb = torch.load(a / f"weights_step{steps}.pt"), torch.load(b / f"weights_step{steps}.pt")
    for name in wa:
        assert_close(wb[name], wa[name], torch.float32, name=f"{what}: {name}")


@pytest.mark.slow
def test_one_rank_and_two_ranks_give_the_same_update(tmp_path: Path) -> None:
    """Loss weighting across micro-batches and ranks reproduces the global token-mean: the same data on one
    process or split over two gives the same training (one mini-batch, rewards independent of the split)."""
    args = ("--max-steps", "2", "--mini-batch-prompts", "6", "--rewards", "per-prompt")
    _torchrun(tmp_path / "one", *args, nproc=1)
    _torchrun(tmp_path / "two", *args, nproc=2)
    _assert_runs_close(tmp_path / "one", tmp_path / "two", 2, "1 vs 2 ranks")


@pytest.mark.slow
def test_fused_and_eager_paths_train_alike(uninterrupted: Path, tmp_path: Path) -> None:
    """use_fused_kernels false (materialised logits, verl-style reference loss; CPU reference model) follows
    the fused run (linear_logprobs + fused_policy_loss; ZeRO-3 reference model) step for step."""
    _torchrun(tmp_path / "eager", "--max-steps", "4", "--eager", "--ref", "cpu")
    _assert_runs_close(uninterrupted, tmp_path / "eager", 4, "fused vs eager")


@pytest.mark.slow
@pytest.mark.parametrize("variant", [("--zero-stage", "0"), ("--zero-stage", "2"), ("--zero-stage", "3", "--offload")],
                         ids=["stage0", "stage2", "stage3-offload"])
def test_zero_stages_and_offload_train_alike(uninterrupted: Path, tmp_path: Path, variant: tuple[str, ...]) -> None:
    """Every ZeRO stage from config, and CPU offload of optimizer and parameters, trains like stage 3."""
    _torchrun(tmp_path / "run", "--max-steps", "4", *variant)
    _assert_runs_close(uninterrupted, tmp_path / "run", 4, " ".join(variant))
