"""The trainer's collectives: one set, in rexrag_fast/train/distributed.py, on the backend's device.

NCCL rejects CPU tensors, so a collective built on the CPU works under gloo (every CPU test) and fails on the
first GPU run. Two guards catch that bug class on a CPU: no module but distributed.py calls a
torch.distributed collective (so every tensor goes through `comm_device()`), and `comm_device()` is CUDA under
nccl. The real 2-rank REX-RAG step (tests/dist_scripts/trainer_rexrag_step.py) also runs every collective
through a wrapper that asserts its tensors are on `comm_device()`.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest
import torch

from rexrag_fast.train import distributed as du

ROOT = Path(__file__).resolve().parents[1]
COLLECTIVES = {"all_reduce", "all_gather", "all_gather_object", "all_gather_into_tensor", "broadcast",
               "broadcast_object_list", "reduce", "reduce_scatter", "reduce_scatter_tensor", "gather",
               "gather_object", "scatter", "all_to_all", "barrier", "send", "recv"}


def _collective_calls(path: Path) -> list[str]:
    """Calls of torch.distributed collectives in `path`, through any alias of the module."""
    tree = ast.parse(path.read_text())
    aliases = {"torch.distributed"}
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            aliases |= {a.asname for a in node.names if a.name == "torch.distributed" and a.asname}
        elif isinstance(node, ast.ImportFrom) and node.module == "torch" and any(a.name == "distributed"
                                                                                   for a in node.names):
            aliases |= {a.asname or a.name for a in node.names if a.name == "distributed"}
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr in COLLECTIVES:
            owner = ast.unparse(node.func.value)
            if owner in aliases:
                found.append(f"{path.relative_to(ROOT)}:{node.lineno} {owner}.{node.func.attr}")
    return found


def test_only_distributed_py_calls_collectives() -> None:
    offenders = [c for p in sorted((ROOT / "rexrag_fast").rglob("*.py")) if p.name != "distributed.py"
                 for c in _collective_calls(p)]
    assert not offenders, "collectives outside rexrag_fast/train/distributed.py:\n" + "\n".join(offenders)
    assert _collective_calls(ROOT / "rexrag_fast" / "train" / "distributed.py"), "the scan finds nothing"


@pytest.mark.parametrize(("backend", "expected"), [("nccl", torch.device("cuda", 1)), ("gloo", torch.device("cpu"))])
def test_comm_device_follows_the_backend(monkeypatch: pytest.MonkeyPatch, backend: str,
                                         expected: torch.device) -> None:
    monkeypatch.setattr(du, "is_initialized", lambda: True)
    monkeypatch.setattr(du.dist, "get_backend", lambda *a: backend)
    monkeypatch.setenv("LOCAL_RANK", "1")
    assert du.comm_device() == expected


def test_collectives_move_their_tensors_to_the_comm_device(monkeypatch: pytest.MonkeyPatch) -> None:
    """With a process group, every tensor handed to torch.distributed is on comm_device() (here a stand-in
    device the values are not on, so a helper that forgot to move them fails)."""
    seen: list[torch.device] = []

    def fake_all_reduce(t: torch.Tensor, op: object = None) -> None:
        seen.append(t.device)
        assert t.device.type == "meta", f"collective tensor on {t.device}, expected the comm device"

    monkeypatch.setattr(du, "is_initialized", lambda: True)
    monkeypatch.setattr(du, "comm_device", lambda: torch.device("meta"))
    monkeypatch.setattr(du.dist, "all_reduce", fake_all_reduce)
    with pytest.raises(NotImplementedError):  # a meta tensor holds no values to read back: the call got there
        du.all_reduce_floats([1.0, 2.0])
    assert seen == [torch.device("meta")]


def test_reductions_without_a_process_group() -> None:
    assert du.all_reduce_floats([1.0, 2.5]) == [1.0, 2.5]
    assert du.sum_across_ranks({"a": 2.0}) == {"a": 2.0}
    assert du.all_reduce_mean({"a": 2.0}) == {"a": 2.0}
    assert du.mean_across_ranks({"b": 3.0}) == {"b": 3.0}
    assert du.max_across_ranks(4) == 4.0
    with pytest.raises(ValueError, match="op: expected one of"):
        du.all_reduce_floats([1.0], op="prod")
