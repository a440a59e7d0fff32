"""In-training validation: EM aggregation by data source (worked by hand) and a real greedy run of the tiny
model on a small world's test questions through `validation.validate`."""

from __future__ import annotations

import pytest

from rexrag_fast.train.config import load_config
from rexrag_fast.train.validation import em_by_source, load_val_examples, validate


def test_em_by_source_by_hand():
    pairs = [("nq", 1.0), ("nq", 0.0), ("hotpotqa", 1.0), ("nq", 1.0)]
    assert em_by_source(pairs) == {"val/em": 0.75, "val/em/hotpotqa": 1.0, "val/em/nq": 2 / 3}
    with pytest.raises(ValueError, match="at least one"):
        em_by_source([])


def test_validate_runs_the_greedy_agent_on_held_out_questions(tmp_path_factory):
    from rexrag_fast.agent.template import DEFAULT_TEMPLATE
    from rexrag_fast.engine import EngineConfig, LLMEngine
    from rexrag_fast.retrieval import LocalRetriever
    from rexrag_fast.train.models import load_model
    from rexrag_fast.train.rollout import agent_config
    from tests.test_agent_eval import small_world

    world = small_world(tmp_path_factory)
    cfg = load_config(None, [f"data.val_files=[{world / 'test.jsonl'}]", "data.val_max_examples=3",
                             "rollout.max_turns=1", "data.max_response_length=3"])
    examples = load_val_examples(cfg)
    assert len(examples) == 3
    model, tokenizer = load_model("tiny-qwen2")
    engine = LLMEngine(model, tokenizer=tokenizer, config=EngineConfig(num_blocks=512, block_size=16,
                                                                       max_num_seqs=4, device="cpu"))
    out = validate(engine, LocalRetriever.for_world(world), examples, agent_config(cfg, seed=None),
                   tokenizer=tokenizer, template=DEFAULT_TEMPLATE, batch_size=2)
    sources = {ex.data_source for ex in examples}
    assert set(out) == {"val/em"} | {f"val/em/{s}" for s in sources}
    assert out["val/em"] == 0.0  # a random model never writes a golden answer


def test_val_config_keys_are_checked():
    from rexrag_fast.train.config import ConfigError

    with pytest.raises(ConfigError, match="data.val_max_examples"):
        load_config(None, ["data.val_max_examples=-1"])
    with pytest.raises(ConfigError, match="trainer.test_freq"):
        load_config(None, ["trainer.test_freq=-2"])
