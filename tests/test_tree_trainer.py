"""actor.tree_packing in the trainer: the config key, the auto rule, and (slow) two ZeRO-3 REX-RAG steps on two
ranks giving the same metrics and weights with tree packing on and off."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
from dist_helpers import run_torchrun

from rexrag_fast.train.config import ConfigError, load_config
from rexrag_fast.train.packing import TREE_PACKING_MIN_SHARING, tree_packing_enabled

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "tests" / "dist_scripts" / "tree_packing_steps.py"
# Work and timing differ by design; everything else a step reports must agree.
DIFFERENT_BY_DESIGN = ("time/", "timing/", "throughput/", "memory/", "actor/update_processed_tokens")


def test_config_key() -> None:
    assert load_config(ROOT / "configs" / "tiny_cpu.yaml").actor.tree_packing == "auto"
    for mode in ("on", "off", "auto"):
        assert load_config(ROOT / "configs" / "tiny_cpu.yaml", [f"actor.tree_packing={mode}"]).actor.tree_packing \
            == mode
    with pytest.raises(ConfigError, match="actor.tree_packing"):
        load_config(ROOT / "configs" / "tiny_cpu.yaml", ["actor.tree_packing=sometimes"])


def test_auto_needs_the_minimum_sharing() -> None:
    prompt = list(range(40))
    shared = [prompt + [100 + i] * 10 for i in range(4)]  # 200 tokens, 80 nodes: 60% saved
    distinct = [[1000 * i + k for k in range(50)] for i in range(4)]  # nothing shared
    assert tree_packing_enabled("auto", shared, 1000)
    assert not tree_packing_enabled("auto", distinct, 1000)
    # Under a budget of one sequence per pack the prompt is repeated in every pack: nothing saved.
    assert not tree_packing_enabled("auto", shared, 50)
    assert tree_packing_enabled("on", distinct, 1000) and not tree_packing_enabled("off", shared, 1000)
    assert 0 < TREE_PACKING_MIN_SHARING < 1


@pytest.mark.slow
def test_two_rank_steps_match_with_and_without_tree_packing(tmp_path: Path) -> None:
    run_torchrun([str(SCRIPT), "--out", str(tmp_path)], cwd=tmp_path, timeout_s=1200)
    result = json.loads((tmp_path / "result.json").read_text())
    assert all(s > 0.2 for s in result["sharing"])  # the real batch shares its prompts and probe prefixes
    assert result["logprob_diff"] < 1e-5
    for step in result["steps"]:
        on, off = step["on"], step["off"]
        assert on.keys() == off.keys()
        assert on["rexrag/probes_made"] >= 1
        assert on["actor/update_processed_tokens"] < off["actor/update_processed_tokens"]
        for key, value in off.items():
            if key.startswith(DIFFERENT_BY_DESIGN) or not isinstance(value, float) or math.isnan(value):
                continue
            assert on[key] == pytest.approx(value, rel=1e-4, abs=1e-6), key
    # Two AdamW steps at lr 1e-3 from the same gradients up to fp32 order. Adam's step m / (sqrt(v) + eps) turns a
    # parameter's near-zero (cancelling) gradient sum into an O(lr) step of either sign, so fp32 order may move a
    # few elements by ~1e-4 (one of ~6M, 1.1e-4, on a 2-core Xeon); a packing bug moves most of them by O(lr).
    assert result["weight_diff_mean"] < 1e-3 * result["update_mean"]
    assert result["weight_diff_above_1e-4"] < 1e-5
