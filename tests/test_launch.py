"""Launching as verl / DeepSpeed / SLURM users do: `--local_rank=N` from the deepspeed launcher, and ranks
from SLURM_* / OMPI_COMM_WORLD_* when no launcher set RANK (real gloo process groups in subprocesses)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from dist_helpers import free_port, torchrun_env

from rexrag_fast.cli import strip_launcher_args
from rexrag_fast.train.distributed import scheduler_rank_env

ROOT = Path(__file__).resolve().parents[1]
TIMEOUT_S = 600  # the first run builds DeepSpeed's CPU comm extension (minutes on a loaded machine)
# One rank: init the process group as `rexrag-fast train` does, all-reduce its rank + 1, report.
PROBE = """
import json, os, torch, torch.distributed as dist
from rexrag_fast.train import distributed as du
du.init_distributed()
t = torch.tensor([float(du.get_rank() + 1)])
dist.all_reduce(t)
print(json.dumps({"rank": dist.get_rank(), "world": dist.get_world_size(), "local_rank": du.get_local_rank(),
                  "sum": t.item(), "backend": dist.get_backend()}), flush=True)
du.destroy_process_group()
"""


def test_local_rank_argument_is_taken_out_anywhere() -> None:
    argv = ["--local_rank=3", "train", "--config", "c.yaml", "--local-rank", "3", "a.b=1"]
    assert strip_launcher_args(argv) == (["train", "--config", "c.yaml", "a.b=1"], 3)
    assert strip_launcher_args(["train", "x=1"]) == (["train", "x=1"], None)
    with pytest.raises(SystemExit):
        strip_launcher_args(["--local_rank=abc", "train"])


def test_scheduler_variables_give_the_ranks() -> None:
    slurm = {"SLURM_PROCID": "5", "SLURM_NTASKS": "8", "SLURM_LOCALID": "1", "SLURM_NTASKS_PER_NODE": "4(x2)"}
    assert scheduler_rank_env(slurm) == {"RANK": "5", "WORLD_SIZE": "8", "LOCAL_RANK": "1", "LOCAL_WORLD_SIZE": "4"}
    ompi = {"OMPI_COMM_WORLD_RANK": "2", "OMPI_COMM_WORLD_SIZE": "4", "OMPI_COMM_WORLD_LOCAL_RANK": "0"}
    assert scheduler_rank_env(ompi)["RANK"] == "2" and scheduler_rank_env(ompi)["WORLD_SIZE"] == "4"
    assert scheduler_rank_env({**slurm, "RANK": "0"}) == {}  # a launcher's RANK wins
    assert scheduler_rank_env({}) == {}


def _env(**extra: str) -> dict[str, str]:
    env = torchrun_env()
    for k in [k for k in env if k.startswith(("SLURM_", "OMPI_"))] + ["RANK", "WORLD_SIZE", "LOCAL_RANK",
                                                                      "MASTER_ADDR", "MASTER_PORT"]:
        env.pop(k, None)
    env.update(extra)
    return env


def _start(env: dict[str, str]) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-c", PROBE], cwd=ROOT, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def _result(proc: subprocess.Popen) -> dict:
    out, err = proc.communicate(timeout=TIMEOUT_S)
    assert proc.returncode == 0, err[-4000:]
    return json.loads(out.strip().splitlines()[-1])


def test_slurm_single_task_gets_a_real_gloo_group() -> None:
    got = _result(_start(_env(SLURM_PROCID="0", SLURM_NTASKS="1", SLURM_LOCALID="0")))
    assert got == {"rank": 0, "world": 1, "local_rank": 0, "sum": 1.0, "backend": "gloo"}


def test_srun_tasks_join_one_world_instead_of_worlds_of_one() -> None:
    port = str(free_port())
    procs = [_start(_env(SLURM_PROCID=str(r), SLURM_NTASKS="2", SLURM_LOCALID=str(r), MASTER_ADDR="127.0.0.1",
                         MASTER_PORT=port)) for r in range(2)]
    got = [_result(p) for p in procs]
    assert [g["rank"] for g in got] == [0, 1] and all(g["world"] == 2 for g in got)
    assert all(g["sum"] == 3.0 for g in got)  # 1 + 2: both ranks took part in the all-reduce


def test_mpirun_tasks_without_master_addr_are_told_what_to_set() -> None:
    proc = _start(_env(OMPI_COMM_WORLD_RANK="0", OMPI_COMM_WORLD_SIZE="2", OMPI_COMM_WORLD_LOCAL_RANK="0"))
    _, err = proc.communicate(timeout=TIMEOUT_S)
    assert proc.returncode != 0 and "MASTER_ADDR is not set" in err


@pytest.mark.skipif(not os.path.exists(os.path.join(os.path.dirname(sys.executable), "deepspeed")),
                    reason="the deepspeed launcher script is not installed next to this Python")
def test_deepspeed_launcher_passes_local_rank_and_we_accept_it(tmp_path: Path) -> None:
    """The real `deepspeed` launcher (one CPU rank): it appends --local_rank=0 to our command line."""
    launcher = os.path.join(os.path.dirname(sys.executable), "deepspeed")
    cmd = [launcher, "--num_gpus", "1", "--master_port", str(free_port()), "--module", "rexrag_fast.cli",
           "train", "--config", str(ROOT / "configs" / "tiny_cpu.yaml"), "--print-config",
           f"trainer.output_dir={tmp_path / 'run'}"]
    proc = subprocess.run(cmd, cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=TIMEOUT_S)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "--local_rank=0" in proc.stdout + proc.stderr  # the launcher logs the command it ran
    assert f"output_dir: {tmp_path / 'run'}" in proc.stdout
