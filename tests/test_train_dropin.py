"""What a verl / REX-RAG user expects of a run: restarting into the same output directory resumes and appends
to metrics.jsonl (trainer.resume_mode auto), HF exports in the checkpoints and by `rexrag-fast export`, a
console line per step, verl's metric names, wandb (offline) and mlflow (file store) backends, and model.path
as a hub id resolved through the Hugging Face cache.

The runs are REAL single-process DeepSpeed ZeRO-3 runs on the CPU (gloo) of a tiny random Qwen2 on the
embedded world, through the `rexrag-fast train` command line.
"""

from __future__ import annotations

import importlib.util
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from dist_helpers import run_torchrun

from rexrag_fast.cli import main as cli_main
from rexrag_fast.train.metrics import MetricsLogger, read_metrics
from rexrag_fast.train.models import ModelSpecError, check_model_spec, load_model

ROOT = Path(__file__).resolve().parents[1]
TINY_CPU = ROOT / "configs" / "tiny_cpu.yaml"
RUN_TIMEOUT_S = 900
TINY_RUN = [
    "model.path=tiny-qwen2", "trainer.seed=5", "trainer.save_every=1", "trainer.export_hf_every=2",
    "data.train_batch_size=2", "actor.ppo_mini_batch_size=2", "rollout.n_agent=2", "rollout.max_turns=1",
    "data.max_prompt_length=512", "data.max_start_length=320", "data.max_response_length=8",
    "actor.max_tokens_per_micro_batch=1024", "actor.lr=1e-3", "trainer.logger=[console]",
    "trainer.progress_bar=false",
]


def _train(out: Path, *overrides: str) -> str:
    proc = run_torchrun(["-m", "rexrag_fast.cli", "train", "--config", str(TINY_CPU), f"trainer.output_dir={out}",
                         *TINY_RUN, *overrides], cwd=ROOT, timeout_s=RUN_TIMEOUT_S, nproc=1)
    return proc.stdout + proc.stderr


@pytest.fixture(scope="module")
def restarted_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str, str]:
    """One step, then the same command with max_steps 2 (and progress bars) into the same directory."""
    out = tmp_path_factory.mktemp("dropin_run")
    first = _train(out, "trainer.max_steps=1")
    second = _train(out, "trainer.max_steps=2", "trainer.progress_bar=true")
    return out, first, second


def test_restart_resumes_and_appends_metrics(restarted_run: tuple[Path, str, str]) -> None:
    out, first, second = restarted_run
    assert "finished at step 1" in first and "resumed from" not in first
    assert f"resumed from {out / 'checkpoints' / 'step_000001'} at step 1" in second
    assert "finished at step 2" in second
    rows = read_metrics(out / "metrics.jsonl")
    assert [r["step"] for r in rows] == [1, 2]  # step 1's line kept, step 2 appended
    assert "step 2/2 | reward" in second  # the console backend's line
    assert "step 1/1 | reward" in first and "generate" not in first  # progress_bar=false: no bars


def test_rollout_phase_and_demo_show_progress_with_eta(restarted_run: tuple[Path, str, str]) -> None:
    from rexrag_fast.train.demo_command import progress_line

    _, _, second = restarted_run
    assert re.search(r"generate: .*\d+/4 \[\d\d:\d\d<\d\d:\d\d", second), second[-3000:]  # tqdm: elapsed<ETA
    assert progress_line(2, 6, 340.0) == "demo: 2/6 RL runs done in 5m 40s, about 11m 20s left"


def test_metrics_carry_verl_names(restarted_run: tuple[Path, str, str]) -> None:
    out, _, _ = restarted_run
    row = read_metrics(out / "metrics.jsonl")[-1]
    assert row["critic/score/mean"] == row["reward/mean"]
    assert row["response_length/mean"] == row["rollout/response_len_mean"]
    assert row["timing_s/gen"] == row["timing/rollout_s"] and row["timing_s/step"] == row["timing/step_s"]
    assert row["perf/throughput"] == row["throughput/train_tokens_per_s"]  # one rank
    assert row["perf/max_memory_allocated_gb"] == row["memory/peak_bytes"] / 2**30


def test_exports_match_the_final_model(restarted_run: tuple[Path, str, str], tmp_path: Path) -> None:
    from safetensors.torch import load_file

    out, _, _ = restarted_run
    final = load_file(out / "final" / "model.safetensors")
    in_ckpt = load_file(out / "checkpoints" / "step_000002" / "hf" / "model.safetensors")  # export_hf_every=2
    assert not (out / "checkpoints" / "step_000001" / "hf").exists()
    assert cli_main(["export", "--checkpoint", str(out), "--out", str(tmp_path / "hf")]) == 0
    exported = load_file(tmp_path / "hf" / "model.safetensors")
    assert final.keys() == in_ckpt.keys() == exported.keys()
    for name, w in final.items():
        assert w.dtype == torch.float32  # the training dtype on the CPU
        assert torch.equal(w, in_ckpt[name]) and torch.equal(w, exported[name]), name
    model, _ = load_model(tmp_path / "hf")
    assert model.config.model_type == "qwen2"


def test_export_of_a_broken_checkpoint_says_why(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    ckpt = tmp_path / "checkpoints" / "step_000001"
    ckpt.mkdir(parents=True)
    (ckpt / "trainer_state.json").write_text("{}")
    assert cli_main(["export", "--checkpoint", str(ckpt), "--out", str(tmp_path / "hf")]) == 2
    assert "no COMPLETE marker" in capsys.readouterr().err


# ----------------------------------------------------------------------------------- model.path


def _fake_hub_cache(home: Path, repo_id: str, model_dir: Path) -> None:
    """The Hugging Face cache layout (hub/models--org--name/{refs/main, snapshots/<rev>/...}) holding the
    files of `model_dir`, as `huggingface-cli download` leaves it."""
    repo = home / "hub" / ("models--" + repo_id.replace("/", "--"))
    rev = "0" * 40
    snap = repo / "snapshots" / rev
    snap.mkdir(parents=True)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(rev)
    for f in model_dir.iterdir():
        (snap / f.name).write_bytes(f.read_bytes())


def _subprocess(code: str, env_extra: dict[str, str]) -> subprocess.CompletedProcess:
    import os

    env = {**os.environ, "HF_HUB_OFFLINE": "1", **env_extra}
    return subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=RUN_TIMEOUT_S)


def test_hub_id_resolves_through_the_cache_and_offline_misses_say_how_to_download(tmp_path: Path) -> None:
    model, tok = load_model("tiny-qwen2")
    model.save_pretrained(tmp_path / "src")
    tok.save_pretrained(tmp_path / "src")
    _fake_hub_cache(tmp_path / "hf_home", "tiny-org/tiny-qwen2", tmp_path / "src")
    code = ("from rexrag_fast.train.models import check_model_spec, load_model\n"
            "print(check_model_spec('tiny-org/tiny-qwen2'))\n"
            "m, t = load_model('tiny-org/tiny-qwen2'); print(m.config.model_type, len(t))\n"
            "load_model('Qwen/Qwen2.5-3B')\n")
    proc = _subprocess(code, {"HF_HOME": str(tmp_path / "hf_home")})
    lines = proc.stdout.split("\n")
    assert lines[0] == "qwen2" and lines[1] == f"qwen2 {len(tok)}", proc.stderr[-3000:]
    assert "HF_HUB_OFFLINE is set and 'Qwen/Qwen2.5-3B' is not in the Hugging Face cache" in proc.stderr
    assert "huggingface-cli download Qwen/Qwen2.5-3B" in proc.stderr


def test_unsupported_architecture_is_refused_by_config_checks(tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "gpt2"}))
    with pytest.raises(ModelSpecError, match=r"model.path: .* is a 'gpt2' model; the rollout engine runs"):
        check_model_spec(tmp_path)
    with pytest.raises(ModelSpecError, match="has no config.json"):
        check_model_spec(tmp_path.parent)
    assert check_model_spec("tiny-qwen2") == "qwen2"


# ------------------------------------------------------------------------------------ backends


def _missing(module: str) -> str | None:
    if importlib.util.find_spec(module):
        return None
    return f"{module} is not installed (pip install \"rexrag-fast[loggers]\")"


def _log_two_runs(out: Path, backend: str) -> None:
    """Step 1 and 2, then a restart at step 1 (as a resumed run) logging step 2 again."""
    cfg = {"actor": {"lr": 1e-6}}
    with MetricsLogger(out, backends=[backend], progress_bar=False, project_name="proj", experiment_name="exp",
                       config=cfg) as logger:
        logger.log(1, {"reward/mean": 0.25, "timing/step_s": 2.0})
        logger.log(2, {"reward/mean": 0.5, "timing/step_s": 2.0})
    with MetricsLogger(out, backends=[backend], progress_bar=False, start_step=1, project_name="proj",
                       experiment_name="exp", config=cfg) as logger:
        logger.log(2, {"reward/mean": 0.75, "timing/step_s": 2.0})


@pytest.mark.skipif(_missing("wandb") is not None, reason=str(_missing("wandb")))
def test_wandb_offline(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    _log_two_runs(tmp_path, "wandb")
    runs = sorted((tmp_path / "wandb").glob("offline-run-*"))
    run_id = (tmp_path / ".wandb_run_id").read_text().strip()
    assert runs and all(r.name.endswith(run_id) for r in runs)  # the restart continued the same run
    assert any(f.suffix == ".wandb" and f.stat().st_size > 0 for r in runs for f in r.iterdir())


@pytest.mark.skipif(_missing("mlflow") is not None, reason=str(_missing("mlflow")))
def test_mlflow_file_store(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    _log_two_runs(tmp_path, "mlflow")
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=(tmp_path / "mlruns").resolve().as_uri())
    exp = client.get_experiment_by_name("proj")
    (run,) = client.search_runs([exp.experiment_id])
    assert run.info.run_name == "exp" and run.data.params["actor.lr"] == "1e-06"
    history = client.get_metric_history(run.info.run_id, "critic/score/mean")  # verl's name, logged too
    assert [(m.step, m.value) for m in history] == [(1, 0.25), (2, 0.5), (2, 0.75)]
