"""Benchmark stage `rollout`, REX-RAG probe rows: on a small embedded world the steered originals answer, their
dead ends become probes, and both modes run the same probes; the counters show the forked prefixes reused.
Nothing here is timed (timings only come from bench/throughput.py)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.stages import rollout  # noqa: E402


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    from rexrag_fast.data.world import generate_world

    wdir = tmp_path_factory.mktemp("world")
    generate_world(n_countries=4, n_cities=12, n_companies=10, n_people=30, n_questions=40).save(wdir)
    return wdir


def test_rexrag_probe_rows_reuse_the_forked_prefix(world):
    from rexrag_fast.engine.loaders import load_smollm2_tokenizer, tiny_model

    tokenizer = load_smollm2_tokenizer()
    model = tiny_model("qwen2", vocab_size=len(tokenizer), seed=0)
    block = 16
    r = dict(questions=4, searches=2, turn_tokens=4, topk=2, obs_tokens=64, max_turns=4, repeats=2)
    messages: list[str] = []
    speed, prefill = rollout._rexrag_probe_rows(model, tokenizer, block, r, "test", None, messages.append,
                                                world_dir=world)
    assert speed.unit == "tokens/s" and speed.value > 0 and speed.baseline_value > 0
    x = prefill.extra
    assert x["originals"] == 4 and 1 <= x["probes"] <= 4
    assert x["probes"] == round(x["originals"] * (1 - x["original_accuracy"]))  # every dead end is probed
    assert x["probe_statuses"] == ["max_turns"]  # random text never answers: the probes run to the final turn
    # both modes ran the same requests on the same tokens
    assert x["generated_cached"] == x["generated_reprefill"] > 0
    assert x["requests"] == x["requests_reprefill"] == 2 * x["probes"]  # one searching turn + the final turn
    assert x["prompt_tokens_cached_engine"] == x["prompt_tokens_reprefill"]
    # re-prefilling computes every prompt token; with the cache, every full block of each forked prefix is reused
    assert prefill.baseline_value == x["prompt_tokens_reprefill"]
    assert prefill.value + x["cached_tokens"] == x["prompt_tokens_cached_engine"]
    assert x["cached_tokens"] >= x["fork_prefix_tokens"] - x["probes"] * (block - 1)
    assert prefill.value < prefill.baseline_value
    assert any("run 1" in m for m in messages)


@pytest.mark.parametrize("tied", [True, False])
def test_shared_prefix_row_counts_every_weight_once(tied):
    """Bytes per decode step start from the weights' size: the shapes must cover a Llama model exactly."""
    import torch

    from rexrag_fast.engine.loaders import tiny_model

    model = tiny_model("llama", vocab_size=300, seed=0, tie_word_embeddings=tied)
    counted = sum(int(torch.tensor(s).prod()) for s in rollout._param_shapes(model.config))
    assert counted == sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_shared_prefix_rows_without_vllm(tmp_path, temperature):
    """Row (d) end to end on a tiny Llama: our worker subprocess serving its rounds, then transformers generate
    as the baseline; greedy and sampled workloads."""
    from rexrag_fast.engine.loaders import tiny_model

    model = tiny_model("llama", vocab_size=300, seed=0)
    model.save_pretrained(tmp_path)
    sizes = dict(label="2 prefixes", prompts=3, prefixes=2, prefix=32, tail=(3, 9), new=4, threads=1,
                 temperature=temperature)
    rows = rollout._shared_prefix_rows(lambda msg: None, tmp_path, None, sizes)
    assert [r.name for r in rows] == ["SmolLM2-135M generate (2 prefixes), run1",
                                      "SmolLM2-135M generate (2 prefixes), run2"]
    assert "2 shared prefix(es) of 32 + 3-9 own tokens" in rows[0].config
    assert ("greedy" if temperature == 0.0 else "temperature 1.0") in rows[0].config
    for r in rows:
        assert r.baseline.startswith("vLLM not configured") and r.value > 0 and r.baseline_value > 0
        assert r.extra["bytes_per_decode_step"] > 0 and r.extra["peak_rss_mb"] > 0
