"""The embedded demo: world demonstrations (format, answers, masks), the warm start, the demo command's outputs."""

from __future__ import annotations

import argparse
import json

import pytest
import torch

from rexrag_fast.agent.actions import extract_answer, parse_action
from rexrag_fast.agent.loop import INFORMATION_TEMPLATE
from rexrag_fast.agent.reward import exact_match
from rexrag_fast.agent.template import encode_prompt
from rexrag_fast.agent.trajectory import Component
from rexrag_fast.retrieval import format_passages
from rexrag_fast.testing import assert_close
from rexrag_fast.train.demonstrations import make_demonstrations
from rexrag_fast.train.warm_start import (
    WarmStartConfig,
    masked_nll,
    save_checkpoint_dir,
    split_by_tokens,
    train_warm_start,
    warm_start_key,
)

N_QUESTIONS = 24


@pytest.fixture(scope="module")
def world():
    from rexrag_fast.data.world import World, default_world_dir

    return World.load(default_world_dir())


@pytest.fixture(scope="module")
def tokenizer():
    from rexrag_fast.engine.loaders import load_smollm2_tokenizer

    return load_smollm2_tokenizer()


@pytest.fixture(scope="module")
def retriever():
    from rexrag_fast.retrieval import LocalRetriever

    return LocalRetriever.for_world()


@pytest.fixture(scope="module")
def demo_set(world, retriever, tokenizer):
    return make_demonstrations(world.split("train")[:N_QUESTIONS], world, retriever, tokenizer, topk=3,
                               max_obs_tokens=128, max_start_length=256)


def _tiny(tokenizer, seed=0):
    from rexrag_fast.engine.loaders import tiny_model

    return tiny_model("qwen2", vocab_size=len(tokenizer), seed=seed, hidden_size=32, intermediate_size=64,
                      num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1)


# ---------------------------------------------------------------------------------------------- demonstrations


def test_demonstrations_cover_questions_in_order(demo_set, world):
    qs = world.split("train")[:N_QUESTIONS]
    kept = [d.question["id"] for d in demo_set.demos]
    assert len(kept) + len(demo_set.skipped) == N_QUESTIONS
    assert [q["id"] for q in qs if q["id"] not in set(demo_set.skipped)] == kept
    # the default world's retriever finds supporting documents by name for nearly every question
    assert demo_set.coverage >= 0.8


def test_demonstration_format_answers_and_masks(demo_set, world, retriever, tokenizer):
    names = {e["doc_id"]: e["name"] for es in world.entities.values() for e in es}
    for d in demo_set.demos:
        t, q = d.trajectory, d.question
        t.check()
        assert t.status == "answer" and t.done
        # the prompt is the agent's prompt for the question (the trainer keeps the last 256 tokens)
        assert t.token_ids[: t.prompt_len] == encode_prompt(q["question"], tokenizer)[-256:]
        # one search per supporting document, by entity name, then one answer turn
        assert d.queries == [names[doc] for doc in q["supporting_docs"]]
        assert [turn.action for turn in t.turns] == ["search"] * len(d.queries) + ["answer"]
        for turn, query in zip(t.turns, d.queries):
            text = tokenizer.decode(t.token_ids[turn.start:turn.end])
            action = parse_action(text)
            assert action.is_search and action.content == query == turn.content
            assert text.startswith("<think>") and text.endswith("</search>")
        last = t.turns[-1]
        assert parse_action(tokenizer.decode(t.token_ids[last.start:last.end])).is_answer
        # the answer, as the reward extracts it, matches a golden answer
        assert exact_match(extract_answer(t.response_text(tokenizer)), q["golden_answers"]) == 1.0
        assert exact_match(t.answer, q["golden_answers"]) == 1.0
        # turns are RESPONSE tokens; between them exactly the observation the agent loop would insert
        for turn in t.turns:
            assert set(t.components[turn.start:turn.end]) == {int(Component.RESPONSE)}
        results = retriever.retrieve(d.queries, topk=3)
        for turn, nxt, result in zip(t.turns, t.turns[1:], results):
            expected = tokenizer.encode(INFORMATION_TEMPLATE.format(format_passages(result).strip()),
                                        add_special_tokens=False)[:128]
            assert t.token_ids[turn.end:nxt.start] == expected
            assert set(t.components[turn.end:nxt.start]) == {int(Component.INFORMATION)}
        assert t.turns[-1].end == len(t)
        # the loss mask is exactly the model-written tokens
        assert t.loss_mask == [c == int(Component.RESPONSE) for c in t.components]
        assert 0 < sum(t.loss_mask) < len(t) - t.prompt_len


def test_question_types_and_hops(demo_set):
    hops = {"1hop": 1, "2hop": 2, "comparison": 2}
    assert {d.question["type"] for d in demo_set.demos} >= {"1hop", "2hop"}
    for d in demo_set.demos:
        assert d.trajectory.num_searches == hops[d.question["type"]]


def test_questions_are_skipped_when_the_observation_lacks_the_fact(world, retriever, tokenizer):
    # 6 observation tokens cannot hold the passage that names the next entity or the answer
    qs = world.split("train")[:6]
    out = make_demonstrations(qs, world, retriever, tokenizer, topk=1, max_obs_tokens=6)
    assert out.demos == [] and out.skipped == [q["id"] for q in qs] and out.coverage == 0.0


def test_content_hash_tracks_the_tokens(demo_set, world, retriever, tokenizer):
    again = make_demonstrations(world.split("train")[:N_QUESTIONS], world, retriever, tokenizer, topk=3,
                                max_obs_tokens=128, max_start_length=256)
    assert again.content_hash() == demo_set.content_hash()
    shorter = make_demonstrations(world.split("train")[:N_QUESTIONS], world, retriever, tokenizer, topk=3,
                                  max_obs_tokens=100, max_start_length=256)
    assert shorter.content_hash() != demo_set.content_hash()


def test_bad_supporting_docs_are_rejected(world, retriever, tokenizer):
    q = dict(world.split("train")[0], supporting_docs=["person-999999"])
    with pytest.raises(ValueError, match="person-999999"):
        make_demonstrations([q], world, retriever, tokenizer)
    with pytest.raises(ValueError, match="max_obs_tokens"):
        make_demonstrations([], world, retriever, tokenizer, max_obs_tokens=0)


# ---------------------------------------------------------------------------------------------- warm start


def test_masked_nll_is_the_mean_nll_of_model_written_tokens(demo_set, tokenizer):
    model = _tiny(tokenizer)
    trajs = [d.trajectory for d in demo_set.demos[:2]]
    got = masked_nll(model, trajs)
    total, count = 0.0, 0
    with torch.no_grad():
        for t in trajs:
            ids = torch.tensor(t.token_ids)
            logp = torch.log_softmax(model(input_ids=ids[None]).logits[0].double(), -1)
            target = torch.tensor(t.loss_mask[1:])
            nll = -logp[:-1].gather(1, ids[1:, None])[:, 0]
            total += float(nll[target].sum())
            count += int(target.sum())
    assert_close(got.detach(), torch.tensor(total / count, dtype=torch.float32), torch.float32, name="masked_nll")
    # information and prompt tokens carry no loss: changing them changes the loss only through the context
    assert count == sum(sum(t.loss_mask) for t in trajs)


def test_warm_start_loss_falls(demo_set, tokenizer):
    model = _tiny(tokenizer)
    trajs = [d.trajectory for d in demo_set.demos[:4]]
    before = float(masked_nll(model, trajs).detach())
    losses = train_warm_start(model, trajs, WarmStartConfig(steps=8, batch_size=2, lr=1e-2, warmup_steps=0))
    after = float(masked_nll(model, trajs).detach())
    assert len(losses) == 8 and all(torch.isfinite(torch.tensor(losses)))
    assert after < 0.8 * before, (before, after, losses)
    assert not model.training


def test_micro_batches_give_the_full_batch_step(demo_set, tokenizer):
    """Gradient accumulation over token-budget micro-batches equals one packed forward over the whole batch."""
    trajs = sorted((d.trajectory for d in demo_set.demos), key=len)[:4]
    groups = split_by_tokens(trajs, budget=len(trajs[0]) + len(trajs[1]))
    assert [len(g) for g in groups] == [2, 1, 1] and [t for g in groups for t in g] == trajs
    assert split_by_tokens(trajs, budget=1) == [[t] for t in trajs]
    whole, parts = _tiny(tokenizer), _tiny(tokenizer)
    big = WarmStartConfig(steps=2, batch_size=4, lr=1e-2, warmup_steps=0, micro_batch_tokens=100_000)
    small = WarmStartConfig(steps=2, batch_size=4, lr=1e-2, warmup_steps=0, micro_batch_tokens=1)
    la, lb = train_warm_start(whole, trajs, big), train_warm_start(parts, trajs, small)
    assert la == pytest.approx(lb, rel=1e-5)
    for (name, pa), pb in zip(whole.named_parameters(), parts.parameters()):
        assert_close(pa, pb, torch.float32, name=name)


def test_warm_start_is_deterministic(demo_set, tokenizer):
    trajs = sorted((d.trajectory for d in demo_set.demos), key=len)[:3]
    cfg = WarmStartConfig(steps=2, batch_size=2, lr=1e-2, warmup_steps=1, seed=7)
    a, b = _tiny(tokenizer), _tiny(tokenizer)
    assert train_warm_start(a, trajs, cfg) == train_warm_start(b, trajs, cfg)
    for (name, pa), pb in zip(a.named_parameters(), b.parameters()):
        assert torch.equal(pa, pb), name


def test_checkpoint_dir_loads_back(demo_set, tokenizer, tmp_path):
    from rexrag_fast.engine.loaders import load_pretrained

    model = _tiny(tokenizer)
    out = save_checkpoint_dir(model, tokenizer, tmp_path / "ws", info={"losses": [1.0]})
    assert json.loads((out / "warm_start.json").read_text()) == {"losses": [1.0]}
    assert not list(tmp_path.glob(".ws.tmp-*"))
    loaded, tok = load_pretrained(out, dtype=torch.float32)
    assert tok.encode("<search> Trostym </search>") == tokenizer.encode("<search> Trostym </search>")
    ids = torch.tensor(demo_set.demos[0].trajectory.token_ids[:64])
    with torch.no_grad():
        assert torch.equal(loaded(input_ids=ids[None]).logits, model(input_ids=ids[None]).logits)
    # saving again replaces the directory
    save_checkpoint_dir(model, tokenizer, out)
    assert not (out / "warm_start.json").exists()


def test_warm_start_key_and_config_checks():
    base = warm_start_key({"name": "small"}, "abc", WarmStartConfig())
    assert base == warm_start_key({"name": "small"}, "abc", WarmStartConfig())
    assert base != warm_start_key({"name": "small"}, "abd", WarmStartConfig())
    assert base != warm_start_key({"name": "small"}, "abc", WarmStartConfig(steps=7))
    assert base != warm_start_key({"name": "smollm2-135m"}, "abc", WarmStartConfig())
    with pytest.raises(ValueError, match="steps"):
        WarmStartConfig(steps=0)
    with pytest.raises(ValueError, match="lr"):
        WarmStartConfig(lr=0.0)
    with pytest.raises(ValueError, match="no demonstration"):
        train_warm_start(torch.nn.Linear(2, 2), [], WarmStartConfig())


# ---------------------------------------------------------------------------------------------- demo command


def test_demo_summary_table_and_plot(tmp_path):
    from rexrag_fast.train.demo_command import format_table, plot, split_em, summarize_run

    rows = [{"step": s, "reward/mean": r, "rexrag/probes_made": p, "rexrag/probes_kept": k,
             "rexrag/probe_cached_tokens": c, "throughput/rollout_tokens_per_s": 10.0 * s, "rexrag/dead_ends": d,
             "rexrag/probe_accuracy": acc, "rexrag/alpha": a, "rexrag/kept_probe_reward": acc,
             "rexrag/kept_probe_source_group_reward": src}
            for s, r, p, k, c, d, acc, a, src in [(1, 0.25, 3, 1, 300, 10, 1.0, 0.1, 0.25),
                                                  (2, 0.5, 2, 3, 200, 8, 0.0, 0.3, 0.5)]]
    rows[1]["val/em"] = 0.125
    run = summarize_run(rows)
    assert run["reward"] == [0.25, 0.5] and run["steps"] == [1, 2]
    assert (run["probes_made"], run["probes_kept"], run["probe_cached_tokens"]) == (5.0, 4.0, 500.0)
    assert run["dead_ends"] == 18.0 and run["alpha_mean"] == pytest.approx(0.2)
    # means over the 4 kept probes (1 at step 1, 3 at step 2), not over steps
    assert run["probe_accuracy"] == pytest.approx(0.25) and run["kept_probe_reward"] == pytest.approx(0.25)
    assert run["kept_probe_source_group_reward"] == pytest.approx((0.25 + 3 * 0.5) / 4)
    assert (run["val_steps"], run["val_em"]) == ([2], [0.125])
    assert run["tokens_per_s"]["rollout_tokens_per_s"] == 15.0
    assert split_em([("world_1hop", 1.0), ("world_1hop", 0.0), ("world_2hop", 1.0)]) == {
        "all": pytest.approx(2 / 3), "dead_end_type": 0.5, "rest": 1.0}
    before = {"all": 0.1, "dead_end_type": 0.0, "rest": 0.2}
    result = {"em_before": before, "n_eval": 10, "runs": [
        {"method": "grpo", "seed": 0, "em_after": {"all": 0.2, "dead_end_type": 0.1, "rest": 0.3},
         **summarize_run([{"step": 1, "reward/mean": 0.3}])},
        {"method": "rexrag", "seed": 0, "em_after": {"all": 0.4, "dead_end_type": 0.35, "rest": 0.45}, **run}]}
    table = format_table(result)
    assert "grpo" in table and "rexrag" in table and " 40.0%" in table and " 35.0%" in table and "10.0%" in table
    assert "dead ends" in table and "probe acc" in table and "source grp" in table
    png = plot(result, tmp_path / "demo.png")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_demo_arguments_are_checked(tmp_path):
    from rexrag_fast.train.demo_command import add_arguments, run

    parser = argparse.ArgumentParser()
    add_arguments(parser)
    args = parser.parse_args(["--steps", "0", "--out", str(tmp_path)])
    with pytest.raises(SystemExit, match="--steps must be >= 1"):
        run(args)
    assert parser.parse_args([]).seeds == [0]
    assert parser.parse_args(["--seeds", "0", "1", "2"]).seeds == [0, 1, 2]


@pytest.mark.slow
def test_short_demo_runs_end_to_end(tmp_path):
    """The quick demo (warm start, then 12 steps of GRPO and of REX-RAG, seed 0) runs to the end and writes
    its table, JSON and plot; REX-RAG made probes, served their prefixes from the prefix cache, and the
    in-training validation logged val/em. Whether the reward or EM rises is the demo report's to show: a
    threshold on a few noisy RL steps is a coin toss on another CPU (the loss on a fixed batch falling is
    test_warm_start_loss_falls)."""
    from rexrag_fast.train.demo_command import add_arguments, run

    parser = argparse.ArgumentParser()
    add_arguments(parser)
    args = parser.parse_args(["--quick", "--out", str(tmp_path), "--no-progress"])
    assert run(args) == 0
    result = json.loads((tmp_path / "demo.json").read_text())
    assert {r["method"] for r in result["runs"]} == {"grpo", "rexrag"}
    assert (tmp_path / "demo.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "REX-RAG" in (tmp_path / "demo.txt").read_text()
    for r in result["runs"]:
        assert r["steps"] == list(range(1, result["steps"] + 1))
        assert r["val_steps"] and all(0.0 <= v <= 1.0 for v in r["val_em"])
        assert set(r["em_after"]) == {"all", "dead_end_type", "rest"}
    rexrag = next(r for r in result["runs"] if r["method"] == "rexrag")
    assert rexrag["probes_made"] > 0 and rexrag["probe_cached_tokens"] > 0


def test_default_small_model_starts_near_uniform(demo_set, tokenizer):
    import math

    from rexrag_fast.train.demo_command import build_model

    model, spec = build_model("world-small", tokenizer, seed=0)
    assert spec["name"] == "world-small" and model.config.vocab_size == len(tokenizer)
    trajs = sorted((d.trajectory for d in demo_set.demos), key=len)[:2]
    with torch.no_grad():
        loss = float(masked_nll(model, trajs))
    assert abs(loss - math.log(len(tokenizer))) < 0.5, loss
    with pytest.raises(ValueError, match="--model"):
        build_model("large", tokenizer)


def test_dead_end_demonstrations(world, retriever, tokenizer):
    questions = world.split("train")[:N_QUESTIONS]
    mixed = make_demonstrations(questions, world, retriever, tokenizer, topk=3, max_obs_tokens=128,
                                dead_end_rate={"1hop": 1.0})
    plain = make_demonstrations(questions, world, retriever, tokenizer, topk=3, max_obs_tokens=128)
    assert plain.dead_ends == 0 and len(mixed.demos) == len(plain.demos)
    dead = [d for d in mixed.demos if not d.queries]
    assert dead and len(dead) == mixed.dead_ends
    assert all(d.question["type"] == "1hop" for d in dead)
    assert sum(d.question["type"] == "1hop" for d in mixed.demos) - len(dead) <= 1  # only when no guess exists
    for d in dead:
        t = d.trajectory
        assert t.status == "answer" and t.num_searches == 0 and exact_match(t.answer, d.question["golden_answers"]) == 0
        text = tokenizer.decode(t.token_ids[t.prompt_len:])
        assert parse_action(text).is_answer and extract_answer(text) == t.answer
        assert set(t.components[t.prompt_len:]) == {Component.RESPONSE}
    # the other question types are demonstrated as before, token for token
    others = {d.question["id"]: d.trajectory.token_ids for d in plain.demos if d.question["type"] != "1hop"}
    assert all(d.trajectory.token_ids == others[d.question["id"]] for d in mixed.demos if d.question["id"] in others)
    with pytest.raises(ValueError, match=r"dead_end_rate\['1hop'\] must be in \[0, 1\]"):
        make_demonstrations(questions, world, retriever, tokenizer, dead_end_rate={"1hop": 1.5})
