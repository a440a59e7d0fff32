"""The rollout side of a training step: which prompts, on which rank, with which agent limits, on which engine.

    questions = the next data.train_batch_size prompts of the seeded data stream (`PromptStream`); this rank
                keeps its contiguous shard (`distributed.shard_range`), so whole GRPO groups live on one rank;
                prompt tokens are cut to data.max_start_length (keeping the end, where the question is)
    rollouts  = run_agent_loop(engine, retriever, each prompt x rollout.n_agent)   current weights
    rewards   = exact match of each trajectory's <answer> against the golden answers  (`StepBatch.originals`)

A question's group id is its position in the data stream: unique across ranks and steps.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from rexrag_fast.agent.loop import INVALID_ACTION_MESSAGE, AgentConfig, load_invalid_action_message, run_agent_loop
from rexrag_fast.agent.template import DEFAULT_TEMPLATE, encode_prompt, load_template
from rexrag_fast.train import distributed as du
from rexrag_fast.train.config import Config
from rexrag_fast.train.metrics import StepMetrics
from rexrag_fast.train.rexrag_stage import SEED_ROLLOUT, derive_seed
from rexrag_fast.train.step_batch import StepBatch

KV_POOL_SHARE = 0.3  # of gpu_memory_utilization x card memory: the rollout KV pool (ZeRO-3 training needs the rest)


class PromptStream:
    """An endless, reproducible order over N examples: epoch e is a permutation seeded by (seed, e)
    (identity when not shuffling). Position p (prompts consumed so far) fixes everything that follows."""

    def __init__(self, num_examples: int, seed: int, shuffle: bool = True) -> None:
        if num_examples < 1:
            raise ValueError(f"num_examples: expected >= 1, got {num_examples}")
        self.n = num_examples
        self.seed = seed
        self.shuffle = shuffle
        self._perm: dict[int, np.ndarray] = {}

    def _order(self, epoch: int) -> np.ndarray:
        if epoch not in self._perm:
            self._perm = {epoch: np.random.default_rng([self.seed, epoch]).permutation(self.n) if self.shuffle
                          else np.arange(self.n)}
        return self._perm[epoch]

    def take(self, position: int, count: int) -> list[int]:
        """Example indices [count] at stream positions position .. position + count - 1."""
        return [int(self._order(p // self.n)[p % self.n]) for p in range(position, position + count)]


def agent_config(cfg: Config, seed: int | None) -> AgentConfig:
    """The agent loop's limits from the config: a trajectory (prompt <= max_start_length) stays within
    data.max_prompt_length + data.max_response_length tokens, the longest the packer must hold."""
    d = cfg.data
    return AgentConfig(
        max_turns=cfg.rollout.max_turns, topk=cfg.retriever.topk, max_obs_tokens=d.max_obs_length,
        max_tokens_per_turn=d.max_response_length,
        max_response_tokens=d.max_prompt_length + d.max_response_length - d.max_start_length,
        temperature=cfg.rollout.temperature, top_p=cfg.rollout.top_p, top_k=cfg.rollout.top_k, seed=seed,
        force_answer=cfg.rollout.force_answer,
        invalid_action_message=(load_invalid_action_message(cfg.rollout.invalid_action_message)
                                if cfg.rollout.invalid_action_message else INVALID_ACTION_MESSAGE),
    )


def kv_pool_blocks(cfg: Config, model_config: Any, num_seqs: int, device: torch.device) -> int:
    """KV blocks of the rollout engine: enough for `num_seqs` trajectories of the longest length at once,
    capped on a GPU at KV_POOL_SHARE * rollout.gpu_memory_utilization of the card (the rest is the actor's;
    the engine preempts and recomputes when the pool runs out).

        block bytes = layers * 2 (K, V) * block_size * kv_heads * head_dim * 2 (bf16)
    """
    bs = cfg.rollout.kv_block_size
    longest = cfg.data.max_prompt_length + cfg.data.max_response_length
    worst = num_seqs * (-(-longest // bs) + 1)
    if device.type != "cuda":
        return worst
    heads = model_config.num_attention_heads
    kv_heads = getattr(model_config, "num_key_value_heads", None) or heads
    head_dim = getattr(model_config, "head_dim", None) or model_config.hidden_size // heads
    block_bytes = model_config.num_hidden_layers * 2 * bs * kv_heads * head_dim * 2
    budget = KV_POOL_SHARE * cfg.rollout.gpu_memory_utilization * torch.cuda.get_device_properties(device).total_memory
    return max(1, min(worst, int(budget // block_bytes)))


def build_engine(cfg: Config, model: torch.nn.Module, tokenizer: Any, device: torch.device) -> Any:
    """The rollout LLMEngine over a copy of `model`'s weights, its KV pool sized for this rank's rollouts."""
    from rexrag_fast.engine import EngineConfig, LLMEngine

    seqs = max(1, -(-cfg.data.train_batch_size // du.get_world_size())) * cfg.rollout.n_agent
    config = EngineConfig(num_blocks=kv_pool_blocks(cfg, model.config, seqs, device),
                          block_size=cfg.rollout.kv_block_size, max_num_seqs=min(seqs, 256),
                          enable_prefix_caching=cfg.rollout.use_prefix_cache, device=device)
    return LLMEngine(model, tokenizer=tokenizer, config=config)


class Rollouts:
    """This rank's questions of each step and their n_agent trajectories on the engine."""

    def __init__(self, cfg: Config, *, engine: Any, retriever: Any, tokenizer: Any, examples: Sequence[Any]) -> None:
        self.cfg = cfg
        self.engine, self.retriever, self.tokenizer = engine, retriever, tokenizer
        self.examples = list(examples)
        self.stream = PromptStream(len(self.examples), cfg.trainer.seed, cfg.data.shuffle)
        self.template = load_template(cfg.data.prompt_template) if cfg.data.prompt_template else DEFAULT_TEMPLATE
        self._agent = agent_config(cfg, None)  # reads the message file once

    def agent_config(self, seed: int | None) -> AgentConfig:
        return dataclasses.replace(self._agent, seed=seed)

    def _prompt(self, index: int) -> list[int]:
        ex = self.examples[index]
        ids = encode_prompt(ex.question, self.tokenizer, messages=ex.messages, template=self.template)
        return ids[-self.cfg.data.max_start_length:]  # left truncation keeps the question's end

    def local_questions(self, position: int) -> tuple[list[list[int]], list[list[str]], list[int]]:
        """This rank's share of the batch at stream `position`: (prompt token ids [P_i], golden answers,
        group ids), one entry per prompt."""
        batch_idx = self.stream.take(position, self.cfg.data.train_batch_size)
        mine = du.shard_range(len(batch_idx), du.get_rank(), du.get_world_size())
        prompts = [self._prompt(batch_idx[i]) for i in mine]
        golds = [list(self.examples[batch_idx[i]].golden_answers) for i in mine]
        return prompts, golds, [position + i for i in mine]

    def run(self, step: int, position: int, metrics: StepMetrics) -> StepBatch:
        """n_agent trajectories per local question of RL step `step` (1-based), with exact-match rewards."""
        n = self.cfg.rollout.n_agent
        prompts, golds, groups = self.local_questions(position)
        gen0 = self.engine.counters.generated_tokens
        seed = derive_seed(self.cfg.trainer.seed, step, du.get_rank(), SEED_ROLLOUT)
        with metrics.timer("time/rollout_s"):
            trajs = run_agent_loop(self.engine, self.retriever, [p for p in prompts for _ in range(n)],
                                   self.agent_config(seed), tokenizer=self.tokenizer,
                                   progress=self.cfg.trainer.progress_bar and du.is_main())  # per turn, ETA
        metrics.add("count/rollout_generated_tokens", self.engine.counters.generated_tokens - gen0)
        return StepBatch.originals(trajs, [g for g in golds for _ in range(n)], [g for g in groups for _ in range(n)])
