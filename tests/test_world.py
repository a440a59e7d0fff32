"""The embedded world: determinism, answerability from the corpus, Search-R1 parquet layout, cache dir."""

from __future__ import annotations

import json

import pyarrow.parquet as pq
import pytest

from rexrag_fast.data.world import World, WorldConfig, default_world_dir, generate_world

SMALL = {"n_countries": 5, "n_cities": 20, "n_companies": 15, "n_people": 60, "n_questions": 150}


@pytest.fixture(scope="module")
def world() -> World:
    return generate_world(seed=3, **SMALL)


def test_same_seed_same_bytes(tmp_path):
    a = generate_world(seed=3, **SMALL).save(tmp_path / "a")
    b = generate_world(seed=3, **SMALL).save(tmp_path / "b")
    for name in ("corpus.jsonl", "train.jsonl", "test.jsonl", "world.json", "train.parquet", "test.parquet"):
        assert (a / name).read_bytes() == (b / name).read_bytes(), name
    c = generate_world(seed=4, **SMALL)
    assert c.documents != generate_world(seed=3, **SMALL).documents


def test_sizes_and_ids(world):
    cfg = world.config
    assert len(world.documents) == cfg.n_countries + cfg.n_cities + cfg.n_companies + cfg.n_people
    assert len({d["id"] for d in world.documents}) == len(world.documents)
    assert len(world.questions) == cfg.n_questions
    assert len({q["question"] for q in world.questions}) == cfg.n_questions
    assert {q["type"] for q in world.questions} == {"1hop", "2hop", "comparison"}
    assert len(world.split("test")) == round(cfg.n_questions * cfg.test_fraction)
    assert len(world.split("train")) + len(world.split("test")) == cfg.n_questions
    names = [e["name"] for es in world.entities.values() for e in es]
    assert len(set(names)) == len(names)


def test_corpus_rows_have_search_r1_layout(world):
    for doc in world.documents:
        assert set(doc) == {"id", "contents"}
        title, text = doc["contents"].split("\n", 1)
        assert title.startswith('"') and title.endswith('"') and len(title) > 2
        assert title.strip('"') in text


def test_every_answer_is_stated_by_its_supporting_documents(world):
    docs = {d["id"]: d["contents"] for d in world.documents}
    entities = {e["doc_id"]: e for es in world.entities.values() for e in es}
    for q in world.questions:
        support = [docs[i] for i in q["supporting_docs"]]
        (answer,) = q["golden_answers"]
        if q["type"] == "1hop":
            assert len(support) == 1 and answer in support[0], q
        elif q["type"] == "2hop":
            # hop 1 names the bridge entity, hop 2 states the answer about it
            first, second = support
            bridge = second.split("\n", 1)[0].strip('"')
            assert bridge in first and answer in second, q
        else:
            a, b = (entities[i] for i in q["supporting_docs"])
            assert answer in (a["name"], b["name"]), q
            key = "born" if "born first" in q["question"] else "population" if "population" in q["question"] \
                else "founded"
            pick = max if key == "population" else min
            assert answer == pick(a, b, key=lambda e: e[key])["name"], q
            assert str(a[key] if key != "population" else f"{a[key]:,}") in docs[a["doc_id"]]


def test_parquet_matches_search_r1_layout(world, tmp_path):
    out = world.save(tmp_path / "w")
    table = pq.read_table(out / "test.parquet")
    assert table.column_names == ["data_source", "prompt", "ability", "reward_model", "extra_info"]
    rows = table.to_pylist()
    test_qs = world.split("test")
    assert len(rows) == len(test_qs)
    for i, (row, q) in enumerate(zip(rows, test_qs)):
        assert row["data_source"] == f"world_{q['type']}"
        assert row["prompt"] == [{"role": "user", "content": q["question"]}]
        assert row["ability"] == "fact-reasoning"
        assert row["reward_model"] == {"style": "rule", "ground_truth": {"target": q["golden_answers"]}}
        assert row["extra_info"] == {"split": "test", "index": i}
    jsonl = [json.loads(line) for line in (out / "train.jsonl").read_text().splitlines()]
    assert jsonl == world.split("train")


def test_save_load_round_trip(world, tmp_path):
    loaded = World.load(world.save(tmp_path / "w"))
    assert loaded.documents == world.documents
    assert loaded.questions == world.questions
    assert loaded.config == world.config


def test_default_world_generated_once_into_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("REXRAG_CACHE", str(tmp_path))
    wdir = default_world_dir()
    assert wdir.parent == tmp_path
    for name in ("corpus.jsonl", "train.jsonl", "test.jsonl", "train.parquet", "test.parquet", "world.json"):
        assert (wdir / name).is_file(), name
    stamp = (wdir / "world.json").stat().st_mtime_ns
    assert default_world_dir() == wdir
    assert (wdir / "world.json").stat().st_mtime_ns == stamp
    w = World.load(wdir)
    assert 1500 <= len(w.documents) <= 5000 and len(w.questions) >= 1000
    assert [p.name for p in tmp_path.iterdir()] == [wdir.name]  # no temporary directory left behind


@pytest.mark.parametrize("bad, message", [
    ({"n_people": 1}, "n_people"),
    ({"n_countries": 10, "n_cities": 5}, "capital"),
    ({"test_fraction": 1.5}, "test_fraction"),
])
def test_bad_config_is_refused(bad, message):
    with pytest.raises(ValueError, match=message):
        generate_world(WorldConfig(**{**SMALL, **bad}))
