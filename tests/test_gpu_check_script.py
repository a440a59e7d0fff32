"""scripts/gpu_check.sh (the one-call GPU check) and scripts/gpu_wheels.sh: what they would run, and their
limits. The CPU rehearsal itself (`gpu_check.sh --cpu`) runs in CI (.ci/run), not here: it takes minutes."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "scripts" / "gpu_check.sh"
STAGES = ("policy_loss", "linear_logprobs", "rollout", "train_step")
DEVICE_CALL_SECONDS = 9 * 60  # what the parts may take together inside one 15-minute device lease


def _plan(*args: str, out: str = "gpu_check_out") -> dict[str, tuple[int, str]]:
    done = subprocess.run(["bash", str(SCRIPT), "--plan", *args], capture_output=True, text=True, timeout=30,
                          env={"PATH": "/usr/bin:/bin", "OUT": out})
    assert done.returncode == 0, done.stderr
    parts = {}
    for line in done.stdout.splitlines()[1:]:
        m = re.match(r"\s+(\S+)\s+(\d+)s(?:\s+(.*))?$", line)
        assert m, line
        parts[m[1]] = (int(m[2]), m[3] or "")
    return parts


@pytest.mark.parametrize("mode", [(), ("--cpu",)], ids=["device-call", "rehearsal"])
def test_plan_has_every_part_and_the_device_call_fits_its_budget(mode):
    parts = _plan(*mode)
    total = parts.pop("total")[0]
    assert list(parts) == ["install", "nvidia-smi", "pytest-gpu", "world", *STAGES, "merge"]
    assert total == sum(limit for limit, _ in parts.values())
    assert all(limit > 0 for limit, _ in parts.values())
    if not mode:  # the rehearsal's limits only catch hangs on a slow CPU
        assert total <= DEVICE_CALL_SECONDS


def test_gpu_plan_runs_the_gpu_tests_and_the_3b_preset():
    parts = _plan(out="/tmp/somewhere")
    assert "pip install --no-index --no-deps --target" in parts["install"][1]
    assert "pip install --no-deps --no-build-isolation -e ." in parts["install"][1]
    assert parts["nvidia-smi"][1] == "nvidia-smi -q"
    pytest_cmd = parts["pytest-gpu"][1]
    assert "-m gpu" in pytest_cmd and "tests/test_gpu_parity.py" in pytest_cmd
    for stage in STAGES:
        assert f"--preset qwen2.5-3b --only {stage} --json /tmp/somewhere/stages/{stage}.json" in parts[stage][1]
    assert "--merge /tmp/somewhere/stages/*.json --json /tmp/somewhere/bench.json" in parts["merge"][1]


def test_every_gpu_marked_test_file_is_in_the_plan():
    marked = {p.name for p in (ROOT / "tests").glob("test_*.py") if "mark.gpu" in p.read_text()}
    listed = set(re.findall(r"tests/(test_\w+\.py)", _plan()["pytest-gpu"][1]))
    assert marked == listed and "test_gpu_parity.py" in marked


def test_cpu_plan_uses_tiny_quick_shapes():
    parts = _plan("--cpu")
    for stage in STAGES:
        assert f"--preset tiny --quick --only {stage}" in parts[stage][1]


def test_unknown_argument_is_refused():
    done = subprocess.run(["bash", str(SCRIPT), "--gpu"], capture_output=True, text=True, timeout=30)
    assert done.returncode == 2 and "unknown argument '--gpu'" in done.stderr


@pytest.mark.parametrize("script", ["gpu_check.sh", "gpu_wheels.sh"])
def test_scripts_parse(script):
    done = subprocess.run(["bash", "-n", str(ROOT / "scripts" / script)], capture_output=True, text=True, timeout=30)
    assert done.returncode == 0, done.stderr


def test_wheel_folder_and_output_are_ignored_by_git():
    ignored = subprocess.run(["git", "check-ignore", ".whl/x.whl", "gpu_check_out/bench.json"], cwd=ROOT,
                             capture_output=True, text=True, timeout=30)
    assert ignored.stdout.split() == [".whl/x.whl", "gpu_check_out/bench.json"]
