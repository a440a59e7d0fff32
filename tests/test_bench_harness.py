"""bench/throughput.py's harness: rows, speed-ups, the table and the JSON layout."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

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


PEAKS = harness.Peaks("test card", bandwidth=1e12, flops=100e12, flops_dtype="bf16", source="given")


def test_roofline_fractions_and_bound() -> None:
    # 0.5 TB in 1 s of a 1 TB/s card: half the bandwidth; 10 TFLOP of 100 TFLOP/s: a tenth.
    roof = harness.Roofline(bytes=0.5e12, flops=10e12, seconds=1.0, peaks=PEAKS)
    assert roof.bandwidth_fraction == 0.5 and roof.flops_fraction == 0.1
    assert roof.bound == "memory"  # 0.5 s of bytes vs 0.1 s of FLOPs
    assert harness.Roofline(bytes=1e9, flops=50e12, seconds=1.0, peaks=PEAKS).bound == "compute"
    assert "50.0% BW" in roof.summary() and "10.0% FLOP/s" in roof.summary()
    with pytest.raises(ValueError, match="seconds"):
        harness.Roofline(bytes=1.0, flops=1.0, seconds=0.0, peaks=PEAKS)


def test_rows_with_a_roofline_get_the_column_and_json() -> None:
    roof = harness.Roofline(bytes=2e9, flops=4e9, seconds=0.01, peaks=PEAKS)
    rows = [harness.Row("a", "x", 1.0, "tok/s", 0.5, "eager", roofline=roof), harness.Row("b", "y", 2.0, "MiB")]
    table = harness.format_table(rows).splitlines()
    assert "roofline" in table[0] and "20.0% BW" in table[2] and table[3].rstrip(" |").endswith("-")
    j = rows[0].to_json()["roofline"]
    assert j["bandwidth_fraction"] == pytest.approx(0.2) and j["peaks"]["device"] == "test card"
    assert rows[1].to_json()["roofline"] is None
    assert "roofline" not in harness.format_table(rows[1:])


def test_device_peaks_rejects_other_devices() -> None:
    with pytest.raises(ValueError, match="'cpu' or 'cuda'"):
        harness.device_peaks("meta")


def test_skips_and_rooflines_reach_json_and_merge(tmp_path: Path, monkeypatch) -> None:
    roof = harness.Roofline(bytes=3e9, flops=1e9, seconds=0.01, peaks=PEAKS)

    def first(preset: str, progress: harness.Progress) -> list[harness.Row]:
        harness.skip("unit_a", "a peer", "not installed")
        return [harness.Row("unit_a", "fused", 8.0, "ops/s", 2.0, "eager", roofline=roof)]

    def second(preset: str, progress: harness.Progress) -> list[harness.Row]:
        return [harness.Row("unit_b", "ratio", 0.1, "fraction")]

    load_stages()
    monkeypatch.setitem(harness.STAGES, "unit_a", first)
    monkeypatch.setitem(harness.STAGES, "unit_b", second)
    a, b, merged = tmp_path / "a.json", tmp_path / "b.json", tmp_path / "all.json"
    assert main(["--only", "unit_a", "--preset", "tiny", "--json", str(a)]) == 0
    assert main(["--only", "unit_b", "--preset", "tiny", "--json", str(b)]) == 0
    payload = json.loads(a.read_text())
    assert payload["skipped"] == [{"stage": "unit_a", "what": "a peer", "reason": "not installed"}]
    assert payload["peaks"][0]["device"] == "test card"
    assert json.loads(b.read_text())["skipped"] == []  # each run starts with no skips
    assert main(["--merge", str(a), str(b), "--json", str(merged)]) == 0
    out = json.loads(merged.read_text())
    assert [r["name"] for r in out["rows"]] == ["fused", "ratio"]
    assert out["rows"][0]["roofline"]["bandwidth_fraction"] == pytest.approx(0.3)
    assert out["rows"][0]["speedup"] == 4.0 and out["skipped"][0]["what"] == "a peer"


def test_merge_of_a_missing_file_fails(tmp_path: Path) -> None:
    assert main(["--merge", str(tmp_path / "absent.json")]) == 2


def test_train_step_gpu_preset_builds_the_qwen25_3b_shape() -> None:
    from bench.harness import QWEN25_3B
    from bench.stages.train_step import shaped_model

    model = shaped_model(QWEN25_3B, seed=0, device="meta")  # shapes only, no memory
    assert round(sum(p.numel() for p in model.parameters()) / 1e9, 2) == 3.09  # Qwen2.5-3B: 3.09B
    assert model.lm_head.weight is model.model.embed_tokens.weight
