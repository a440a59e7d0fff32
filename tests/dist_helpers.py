"""Launching the 2-process CPU (gloo / DeepSpeed ZeRO-3) test runs, shared by the distributed tests."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def torchrun_env() -> dict[str, str]:
    """This process's environment for a CPU DeepSpeed run: offline, one OpenMP thread per rank, unbuffered."""
    env = dict(os.environ)
    env.update({
        "DS_ACCELERATOR": "cpu",
        "TORCH_EXTENSIONS_DIR": os.path.expanduser("~/.cache/rexrag_fast/torch_extensions"),
        "OMP_NUM_THREADS": "1",
        "HF_HUB_OFFLINE": "1",
        "PYTHONUNBUFFERED": "1",
    })
    env.pop("TRITON_INTERPRET", None)  # CPU tensors take the PyTorch backends; the interpreter is not needed
    return env


def torchrun_command(target: list[str], nproc: int = 2) -> list[str]:
    """The command line running ``python <target>`` on `nproc` ranks (``target`` may start with ``-m module``).

    One process runs without a launcher: init_distributed then makes a world of one by itself.
    """
    launch = [] if nproc == 1 else ["-m", "torch.distributed.run", f"--nproc_per_node={nproc}",
                                    f"--master_port={free_port()}"]
    return [sys.executable, *launch, *target]


def run_torchrun(target: list[str], cwd: Path, timeout_s: float, nproc: int = 2) -> subprocess.CompletedProcess:
    """Run torchrun_command(target, nproc) to the end; a non-zero exit raises AssertionError with its output."""
    cmd = torchrun_command(target, nproc)
    proc = subprocess.run(cmd, cwd=cwd, env=torchrun_env(), capture_output=True, text=True, timeout=timeout_s)
    if proc.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} exited {proc.returncode}\n--- stdout\n{proc.stdout[-4000:]}"
                             f"\n--- stderr\n{proc.stderr[-8000:]}")
    return proc
