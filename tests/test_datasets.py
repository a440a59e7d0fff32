"""QA loaders: Search-R1 parquet, FlashRAG JSONL, the embedded world's splits."""

from __future__ import annotations

import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from file_helpers import assert_refused

from rexrag_fast.agent.template import DEFAULT_TEMPLATE, build_instruction, encode_prompt
from rexrag_fast.data.datasets import load_many, load_qa, load_world_split


def _search_r1_rows() -> list[dict]:
    rows = []
    for i, (q, golds, src) in enumerate([("who wrote hamlet", ["Shakespeare", "William Shakespeare"], "nq"),
                                          ("capital of peru", ["Lima"], "triviaqa")]):
        rows.append({
            "id": f"{src}-{i}", "question": q, "golden_answers": golds, "data_source": src,
            "prompt": [{"role": "user", "content": build_instruction(q)}],
            "ability": "fact-reasoning",
            "reward_model": {"style": "rule", "ground_truth": {"target": golds}},
            "extra_info": {"split": "test", "index": i},
        })
    return rows


def test_search_r1_parquet(tmp_path) -> None:
    path = tmp_path / "test.parquet"
    pq.write_table(pa.Table.from_pylist(_search_r1_rows()), path)
    data = load_qa(path)
    assert [d.data_source for d in data] == ["nq", "triviaqa"]
    assert data[0].golden_answers == ["Shakespeare", "William Shakespeare"]
    assert data[0].id == "nq-0" and data[0].question == "who wrote hamlet"
    assert data[0].messages[0]["content"].startswith(DEFAULT_TEMPLATE.split("{question}")[0])
    assert data[1].extra["extra_info"] == {"split": "test", "index": 1}
    assert len(load_qa(path, limit=1)) == 1


def test_parquet_without_source_columns(tmp_path) -> None:
    rows = [{k: v for k, v in r.items() if k not in ("id", "question", "golden_answers")} for r in _search_r1_rows()]
    path = tmp_path / "x.parquet"
    pq.write_table(pa.Table.from_pylist(rows), path)
    data = load_qa(path)
    assert data[0].question == "who wrote hamlet?"  # taken from the instruction after "Question:"
    assert data[1].golden_answers == ["Lima"] and data[1].id == "1"


def test_flashrag_jsonl_source_from_directory(tmp_path) -> None:
    d = tmp_path / "hotpotqa"
    d.mkdir()
    path = d / "dev.jsonl"
    path.write_text(
        json.dumps({"id": "a", "question": "q1", "golden_answers": ["x"]}) + "\n\n"
        + json.dumps({"id": "b", "question": "q2", "golden_answers": "y", "data_source": "other"}) + "\n"
    )
    data = load_qa(path)
    assert [(e.id, e.data_source, e.golden_answers, e.messages) for e in data] == [
        ("a", "hotpotqa", ["x"], None), ("b", "other", ["y"], None)]
    assert load_qa(path, data_source="forced")[0].data_source == "forced"
    named = tmp_path / "bamboogle.jsonl"
    named.write_text(json.dumps({"question": "q", "golden_answers": ["z"]}) + "\n")
    assert load_many([path, named])[-1].data_source == "bamboogle"


def test_bad_files(tmp_path) -> None:
    with pytest.raises(FileNotFoundError, match="no QA data file"):
        load_qa(tmp_path / "missing.jsonl")
    bad = tmp_path / "bad.jsonl"
    assert_refused(load_qa, bad, '{"question": "q", "golden_answers": ["a"]}\n{oops\n', r"bad.jsonl:2: not valid JSON")
    assert_refused(load_qa, tmp_path / "noans.jsonl", '{"question": "q"}\n', "no golden answers")
    assert_refused(load_qa, tmp_path / "x.csv", "a,b\n", "unknown QA file type '.csv'")


def test_world_split() -> None:
    data = load_world_split("test")
    assert len(data) > 10
    assert all(d.data_source.startswith("world_") for d in data)
    # the world's parquet holds bare questions: read as questions, the agent applies the template
    assert all(d.messages is None and d.question and d.golden_answers for d in data)
    with pytest.raises(ValueError, match="splits 'train' and 'test'"):
        load_world_split("dev")


def test_world_prompt_wrapped_with_template() -> None:
    from rexrag_fast.engine.loaders import load_smollm2_tokenizer

    tok = load_smollm2_tokenizer()
    ex = load_world_split("test")[0]
    text = tok.decode(encode_prompt(ex.question, tok, messages=ex.messages))
    assert DEFAULT_TEMPLATE.split("{question}")[0] in text and ex.question.rstrip("?") in text
