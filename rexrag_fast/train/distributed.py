"""Rank/world helpers that also work in a single process without torch.distributed, batch sharding across
ranks, and process-group set-up/tear-down (gloo on CPU, nccl on GPU, through DeepSpeed).

Launch with `torchrun --nproc_per_node=N script.py` or `deepspeed --num_gpus N script.py`. The launchers set
RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR and MASTER_PORT, which `init_distributed` reads. Under `srun` or
`mpirun` without those, the scheduler's own variables stand in (`scheduler_rank_env`: SLURM_PROCID /
SLURM_NTASKS / SLURM_LOCALID, or OMPI_COMM_WORLD_RANK / _SIZE / _LOCAL_RANK), so each task joins one world
instead of making a world of one; MASTER_ADDR must then be exported by the job script (a multi-process world
without it is an error saying so). A plain `python script.py` runs as a world of one.

Multi-node, with passwordless ssh and the same paths on every node (the output directory on a shared file
system, since checkpoints are written by every rank):

    # hostfile: one line per node, "<host> slots=<GPUs>"
    node-a slots=8
    node-b slots=8

    deepspeed --hostfile hostfile --master_addr node-a script.py ...
    # or, on each node i of 2:
    torchrun --nnodes 2 --node_rank i --nproc_per_node 8 --rdzv-backend c10d --rdzv-endpoint node-a:29500 script.py
"""

from __future__ import annotations

import atexit
import contextlib
import os
import re
import socket
import warnings
from collections.abc import Iterator, Mapping, Sequence
from typing import Any, TypeVar

import torch
import torch.distributed as dist

T = TypeVar("T")


def is_initialized() -> bool:
    return dist.is_available() and dist.is_initialized()


def get_rank() -> int:
    return dist.get_rank() if is_initialized() else int(os.environ.get("RANK", "0"))


def get_world_size() -> int:
    return dist.get_world_size() if is_initialized() else int(os.environ.get("WORLD_SIZE", "1"))


def get_local_rank() -> int:
    return int(os.environ.get("LOCAL_RANK", "0"))


def is_main() -> bool:
    return get_rank() == 0


def barrier() -> None:
    if is_initialized():
        dist.barrier()


def broadcast_object(obj: T, src: int = 0) -> T:
    """`obj` from rank `src` on every rank (picklable objects); identity without a process group."""
    if not is_initialized():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def comm_device() -> torch.device:
    """The device that collective tensors must live on: cuda:LOCAL_RANK under nccl (which rejects CPU
    tensors), the CPU under gloo or without a process group."""
    if is_initialized() and dist.get_backend() == "nccl":
        return torch.device("cuda", get_local_rank())
    return torch.device("cpu")


_REDUCE_OPS = {"sum": "SUM", "max": "MAX", "min": "MIN"}


def all_reduce_floats(values: Sequence[float], op: str = "sum") -> list[float]:
    """Elementwise `op` (sum, max, min) of `values` [N] over ranks, in float64 on `comm_device()`; the
    same list on every rank. Identity without a process group. Collective."""
    if op not in _REDUCE_OPS:
        raise ValueError(f"op: expected one of {sorted(_REDUCE_OPS)}, got {op!r}")
    if not is_initialized() or not values:
        return [float(v) for v in values]
    t = torch.tensor([float(v) for v in values], dtype=torch.float64, device=comm_device())
    dist.all_reduce(t, op=getattr(dist.ReduceOp, _REDUCE_OPS[op]))
    return t.cpu().tolist()


def sum_across_ranks(values: Mapping[str, float]) -> dict[str, float]:
    """Sum of each scalar over ranks; every rank must pass the same keys. Collective."""
    keys = sorted(values)
    return dict(zip(keys, all_reduce_floats([values[k] for k in keys])))


def all_reduce_mean(values: Mapping[str, float]) -> dict[str, float]:
    """Mean of each scalar over ranks; every rank must pass the same keys. Collective."""
    world = get_world_size()
    return {k: v / world for k, v in sum_across_ranks(values).items()}


def mean_across_ranks(values: Mapping[str, float]) -> dict[str, float]:
    """Mean of each scalar over the ranks that report it (keys may differ between ranks). Collective."""
    seen: dict[str, list[float]] = {}
    for d in gather_objects({k: float(v) for k, v in values.items()}):
        for k, v in d.items():
            seen.setdefault(k, []).append(v)
    return {k: sum(v) / len(v) for k, v in seen.items()}


def max_across_ranks(value: float) -> float:
    """The largest `value` of any rank. Collective."""
    return all_reduce_floats([value], op="max")[0]


def default_device() -> torch.device:
    """cuda:LOCAL_RANK when CUDA is usable, else cpu."""
    if torch.cuda.is_available():
        return torch.device("cuda", get_local_rank())
    return torch.device("cpu")


# (rank, world size, local rank, local world size) variables of each scheduler, first match wins.
SCHEDULER_RANK_VARS = {
    "slurm": ("SLURM_PROCID", "SLURM_NTASKS", "SLURM_LOCALID", "SLURM_NTASKS_PER_NODE"),
    "openmpi": ("OMPI_COMM_WORLD_RANK", "OMPI_COMM_WORLD_SIZE", "OMPI_COMM_WORLD_LOCAL_RANK",
                "OMPI_COMM_WORLD_LOCAL_SIZE"),
}
DEFAULT_MASTER_PORT = "29500"  # torchrun's default


def scheduler_rank_env(environ: Mapping[str, str]) -> dict[str, str]:
    """RANK / WORLD_SIZE / LOCAL_RANK / LOCAL_WORLD_SIZE from a scheduler's variables (SLURM, Open MPI) when
    no launcher set RANK; {} when RANK is set or no scheduler variables are present. Pure: reads `environ`."""
    if "RANK" in environ:
        return {}
    for rank_var, size_var, local_var, local_size_var in SCHEDULER_RANK_VARS.values():
        if rank_var in environ and size_var in environ:
            # SLURM_NTASKS_PER_NODE may read "4(x2)"; its leading count is this node's.
            local_size = re.match(r"\d+", environ.get(local_size_var, "")) or None
            return {"RANK": environ[rank_var], "WORLD_SIZE": environ[size_var],
                    "LOCAL_RANK": environ.get(local_var, "0"),
                    "LOCAL_WORLD_SIZE": local_size.group(0) if local_size else environ[size_var]}
    return {}


def _set_rank_env() -> None:
    """Fill RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, MASTER_PORT in os.environ when no launcher did."""
    from_scheduler = scheduler_rank_env(os.environ)
    if from_scheduler:
        os.environ.update(from_scheduler)
        if int(from_scheduler["WORLD_SIZE"]) > 1 and "MASTER_ADDR" not in os.environ:
            raise RuntimeError(
                f"{from_scheduler['WORLD_SIZE']} tasks found through the scheduler's variables (RANK "
                f"{from_scheduler['RANK']}), but MASTER_ADDR is not set: export MASTER_ADDR (the first node's "
                "host name, e.g. $(scontrol show hostnames $SLURM_JOB_NODELIST | head -n1)) and MASTER_PORT "
                "in the job script before srun / mpirun")
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        os.environ.setdefault("MASTER_PORT", DEFAULT_MASTER_PORT if int(from_scheduler["WORLD_SIZE"]) > 1
                              else str(_free_port()))
    elif "RANK" not in os.environ:  # not under a launcher: a world of one
        os.environ.update({"RANK": "0", "WORLD_SIZE": "1", "LOCAL_RANK": "0", "LOCAL_WORLD_SIZE": "1"})
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        os.environ.setdefault("MASTER_PORT", str(_free_port()))


def init_distributed(backend: str | None = None) -> None:
    """Create the default process group through DeepSpeed: gloo on CPU, nccl on GPU unless `backend` says.

    Safe to call twice. On CPU DeepSpeed needs DS_ACCELERATOR=cpu (set here if unset) and builds a small
    shared-memory comm extension the first time; TORCH_EXTENSIONS_DIR defaults to a per-user cache so later
    runs reuse it.
    """
    if is_initialized():
        return
    _set_rank_env()
    cuda = torch.cuda.is_available()
    if not cuda:
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    os.environ.setdefault(
        "TORCH_EXTENSIONS_DIR", os.path.join(os.path.expanduser("~"), ".cache", "rexrag_fast", "torch_extensions")
    )
    import deepspeed

    # DeepSpeed 0.19 still calls the collectives torch 2.13 renamed; the warning repeats on every step and
    # buries the progress bars. It names no problem of ours.
    warnings.filterwarnings("ignore", message=r"`torch\.distributed\.\w+` is deprecated", category=FutureWarning)
    if cuda:
        torch.cuda.set_device(get_local_rank())
    deepspeed.init_distributed(dist_backend=backend or ("nccl" if cuda else "gloo"))
    atexit.register(destroy_process_group)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def destroy_process_group() -> None:
    """Tear the default process group down if there is one (idempotent). Exiting without it makes gloo
    abort intermittently at interpreter shutdown. No barrier first: on an error path the other ranks may
    be inside a different collective, and a barrier would hang instead of letting the launcher see the
    failure."""
    if is_initialized():
        with contextlib.suppress(Exception):
            dist.destroy_process_group()


@contextlib.contextmanager
def distributed_session(backend: str | None = None) -> Iterator[None]:
    """`with distributed_session(): ...` initialises the process group and always destroys it on exit."""
    init_distributed(backend)
    try:
        yield
    finally:
        destroy_process_group()


def shard_range(n: int, rank: int | None = None, world_size: int | None = None) -> range:
    """The contiguous slice of `n` items owned by `rank`: sizes differ by at most one, lower ranks larger.

    rank r gets [r*q + min(r, m), (r+1)*q + min(r+1, m)) with q, m = divmod(n, world_size).
    """
    rank = get_rank() if rank is None else rank
    world_size = get_world_size() if world_size is None else world_size
    if world_size < 1 or not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} is not in a world of size {world_size}")
    q, m = divmod(n, world_size)
    start = rank * q + min(rank, m)
    return range(start, start + q + (1 if rank < m else 0))


def shard_batch(items: Sequence[T], rank: int | None = None, world_size: int | None = None) -> list[T]:
    """This rank's contiguous share of `items` (see `shard_range`). Keep group members together by
    sharding prompts, not trajectories, before rollouts expand each prompt into its group."""
    return [items[i] for i in shard_range(len(items), rank, world_size)]


def gather_objects(obj: Any) -> list[Any]:
    """Every rank's `obj`, in rank order, on every rank; `[obj]` without a process group."""
    if not is_initialized():
        return [obj]
    out: list[Any] = [None] * get_world_size()
    dist.all_gather_object(out, obj)
    return out
