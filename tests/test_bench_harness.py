"""bench/throughput.py's harness: rows, speed-ups, the table and the JSON layout."""

from __future__ import annotations

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench import harness  # noqa: E402
from bench.throughput import load_stages, main  # noqa: E402


def test_speedup_is_value_over_baseline() -> None:
    row = harness.Row("s", "n", value=30.0, unit="ops/s", baseline_value=10.0)
    assert row.speedup == 3.0
    assert harness.Row("s", "n", value=1.0, unit="x").speedup is None
    assert row.to_json()["speedup"] == 3.0


def test_table_has_one_line_per_row() -> None:
    rows = [harness.Row("a", "x", 1.0, "tok/s", 0.5, "eager"), harness.Row("b", "y", 2e6, "ops/s")]
    table = harness.format_table(rows).splitlines()
    assert len(table) == 2 + len(rows)
    assert "2.00x" in table[2] and "2e+06" in table[3]


def test_every_stage_module_registers_itself() -> None:
    load_stages()
    stage_files = {p.stem for p in (Path(harness.__file__).parent / "stages").glob("*.py")} - {"__init__"}
    assert stage_files <= set(harness.STAGES)


def test_main_writes_env_and_rows(tmp_path: Path, monkeypatch) -> None:
    calls = []

    def tiny_stage(preset: str, progress: harness.Progress) -> list[harness.Row]:
        calls.append(preset)
        progress("working")
        return [harness.Row("unit_test_stage", "only", 4.0, "ops/s", 2.0, "half")]

    load_stages()
    monkeypatch.setitem(harness.STAGES, "unit_test_stage", tiny_stage)
    out = tmp_path / "r.json"
    assert main(["--only", "unit_test_stage", "--preset", "tiny", "--json", str(out)]) == 0
    payload = json.loads(out.read_text())
    assert calls == ["tiny"]
    assert {"git_sha", "cpu", "gpu", "torch", "triton", "preset"} <= set(payload["env"])
    row = payload["rows"][0]
    assert {k: row[k] for k in ("stage", "name", "value", "unit", "baseline_value", "speedup")} == {
        "stage": "unit_test_stage", "name": "only", "value": 4.0, "unit": "ops/s", "baseline_value": 2.0,
        "speedup": 2.0,
    }


def test_failing_stage_makes_exit_code_nonzero(monkeypatch) -> None:
    def broken(preset: str, progress: harness.Progress) -> list[harness.Row]:
        raise RuntimeError("boom")

    load_stages()
    monkeypatch.setitem(harness.STAGES, "unit_test_broken", broken)
    assert main(["--only", "unit_test_broken"]) == 1
