"""`rexrag-fast eval`: scoring summary, table, and an end-to-end run with the tiny model on a small world."""

from __future__ import annotations

import json

import pytest

from rexrag_fast.agent.eval_command import EvalRecord, format_table, summarize
from rexrag_fast.agent.reward import exact_match, f1_score


def _rec(src: str, em: float, f1: float) -> EvalRecord:
    return EvalRecord(id="x", data_source=src, question="q", golden_answers=["a"], answer="a", em=em, f1=f1,
                      status="answer", turns=1, searches=0, response_tokens=3)


def test_summarize_macro_and_micro() -> None:
    recs = [_rec("nq", 1.0, 1.0), _rec("nq", 0.0, 0.5), _rec("nq", 0.0, 0.0), _rec("bamboogle", 1.0, 1.0)]
    s = summarize(recs)
    assert list(s["per_source"]) == ["bamboogle", "nq"]
    assert s["per_source"]["nq"] == {"n": 3, "em": pytest.approx(1 / 3), "f1": pytest.approx(0.5)}
    assert s["average"]["em"] == pytest.approx((1 / 3 + 1.0) / 2)  # mean over sources
    assert s["overall"] == {"n": 4, "em": pytest.approx(0.5), "f1": pytest.approx(2.5 / 4)}
    table = format_table(s)
    assert "nq" in table and "33.33" in table and "average" in table and "66.67" in table
    with pytest.raises(ValueError, match="no records"):
        summarize([])


def small_world(tmp_path_factory):
    """A small embedded world (~80 documents), shared by the agent test modules of one session with its index."""
    from rexrag_fast.data.world import generate_world

    wdir = tmp_path_factory.getbasetemp() / "agent-small-world"
    if not (wdir / "world.json").is_file():
        generate_world(n_countries=4, n_cities=12, n_companies=10, n_people=30, n_questions=40).save(wdir)
    return wdir


def test_cli_eval_end_to_end(tmp_path, tmp_path_factory) -> None:
    from rexrag_fast.cli import main

    world = small_world(tmp_path_factory)
    out = tmp_path / "scores.json"
    rc = main(["eval", "--model", "tiny-qwen2", "--data", str(world / "test.parquet"), str(world / "test.jsonl"),
               "--retriever", str(world), "--n", "2", "--max-turns", "1", "--max-tokens-per-turn", "3",
               "--json", str(out), "--no-progress", "--batch-size", "3"])
    assert rc == 0
    payload = json.loads(out.read_text())
    assert payload["overall"]["n"] == 4 and len(payload["examples"]) == 4
    # parquet rows carry world_<type> sources; the JSONL file's rows take the directory's name
    sources = {e["data_source"] for e in payload["examples"]}
    assert world.name in sources and any(s.startswith("world_") for s in sources)
    assert sum(v["n"] for v in payload["per_source"].values()) == 4
    for e in payload["examples"]:
        assert e["em"] == exact_match(e["answer"], e["golden_answers"])
        assert e["f1"] == f1_score(e["answer"], e["golden_answers"])
        assert e["turns"] <= 2
    assert payload["config"]["max_turns"] == 1


def test_cli_eval_bad_arguments(tmp_path) -> None:
    from rexrag_fast.agent.eval_command import load_model, load_retriever

    with pytest.raises(ValueError, match="--model must be"):
        load_model(str(tmp_path / "nope"))
    with pytest.raises(ValueError, match="--retriever must be"):
        load_retriever(str(tmp_path / "nope"))
