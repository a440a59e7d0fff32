"""In-training validation: held-out exact match of the current policy every trainer.test_freq steps.

    val/em            = mean EM over the validation questions (greedy agent loop, the training agent limits)
    val/em/<source>   = the same per data_source (e.g. nq, hotpotqa, or the world's 1hop / 2hop / comparison)

The questions are data.val_files, or the embedded world's test split when that list is empty, cut to
data.val_max_examples (0: all). Each rank scores its contiguous shard on its own rollout engine (which
holds the synced weights) in batches of data.val_batch_size prompts; sums are gathered, so every rank
returns the same figures. The engine's sampling state is not touched: greedy decoding draws nothing.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

from rexrag_fast.agent.loop import AgentConfig
from rexrag_fast.train import distributed as du
from rexrag_fast.train.config import Config


def load_val_examples(cfg: Config) -> list[Any]:
    """QAExamples of data.val_files, or the embedded world's test split; the first data.val_max_examples."""
    from rexrag_fast.data.datasets import load_many, load_world_split

    examples = load_many(cfg.data.val_files) if cfg.data.val_files else load_world_split("test")
    if cfg.data.val_max_examples:
        examples = examples[: cfg.data.val_max_examples]
    if not examples:
        raise ValueError(f"data.val_files: no examples in {cfg.data.val_files or 'the embedded world test split'}")
    return examples


def em_by_source(records: Sequence[tuple[str, float]]) -> dict[str, float]:
    """{"val/em": mean EM, "val/em/<source>": mean EM of each data_source} from (data_source, em) pairs [N]."""
    if not records:
        raise ValueError("records: expected at least one (data_source, em) pair")
    out = {"val/em": sum(em for _, em in records) / len(records)}
    for source in sorted({s for s, _ in records}):
        ems = [em for s, em in records if s == source]
        out[f"val/em/{source}"] = sum(ems) / len(ems)
    return out


def validate(engine: Any, retriever: Any, examples: Sequence[Any], agent: AgentConfig, *, tokenizer: Any,
             template: str, batch_size: int) -> dict[str, float]:
    """Greedy held-out EM of the engine's policy on `examples` [N], sharded over ranks; the same dict on
    every rank (`em_by_source`). Collective."""
    from rexrag_fast.agent.eval_command import evaluate

    mine = du.shard_batch(list(examples))
    greedy = dataclasses.replace(agent, temperature=0.0, seed=None)
    records = evaluate(engine, retriever, mine, greedy, tokenizer=tokenizer, batch_size=batch_size,
                       template=template, progress=False) if mine else []
    pairs = [pair for part in du.gather_objects([(r.data_source, r.em) for r in records]) for pair in part]
    return em_by_source(pairs)
