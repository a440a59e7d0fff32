"""The one seam between GRPO and REX-RAG in a training step: an exploration stage.

The trainer calls, on every rank, in this order (DESIGN.md's data flow):

    stage.explore(batch, step, metrics)           after the rollout: probes appended to `batch`
    batch, alpha, m = stage.filter_and_correct(batch)   after the old log-probs: kept batch, probe share, metrics

`GRPOStage` does nothing at either point (alpha = 0, every trajectory kept: plain GRPO). `RexRagStage` owns
REX-RAG's state across steps (the tokenised exploratory-prompt pool of algorithm.rexrag.prompt_pool, its
prefix trie, the keep-ratio EMA):

    explore: dead ends (answered in a searching turn, reward < 1, u < revision_prob) forked at their answer
             with an exploratory prompt, continued on the engine (prefix KV from the radix cache); a probe
             joins its source's group
    filter:  every original and the best-ranked probes (mean old log-prob of the inserted prompt): ONE top-K
             over the probes of all ranks (the reference ranks the whole step's probes together), K =
             keep_probe_count(keep_ratio, train_batch_size, n_agent, multiple_of=world); each rank keeps its
             probes among those K (`probes_kept_per_rank`), so a rank with more plausible probes keeps more
    correct: err = 1 - accuracy of the originals, alpha = kept probes / kept trajectories, both over all
             ranks; probe_logprobs = log mu (`rexrag.probe_distribution.probe_logprobs`), -inf off probes;
             then the keep-ratio EMA folds in the accuracy of the kept probes

Random draws come from seeds derived from (seed, step, rank, purpose), so a resumed run repeats them.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any, Protocol

import numpy as np
import torch

from rexrag_fast.agent.loop import AgentConfig
from rexrag_fast.agent.trajectory import Component
from rexrag_fast.train import distributed as du
from rexrag_fast.train.config import Config
from rexrag_fast.train.metrics import StepMetrics
from rexrag_fast.train.packing import pack_sequences
from rexrag_fast.train.step_batch import StepBatch

# Purposes of derived seeds (one independent stream each); 1 is the rollout's own.
SEED_ROLLOUT, SEED_PROBE_ROLLOUT, SEED_PROBE_DRAWS = 1, 2, 3


def derive_seed(*parts: int) -> int:
    """A 31-bit seed that is a fixed function of the integers `parts` (numpy SeedSequence mixing)."""
    return int(np.random.SeedSequence([int(p) for p in parts]).generate_state(1)[0] & 0x7FFFFFFF)


class ExplorationStage(Protocol):
    def explore(self, batch: StepBatch, step: int, metrics: StepMetrics) -> None: ...

    def filter_and_correct(self, batch: StepBatch) -> tuple[StepBatch, float, dict[str, float]]: ...

    def state_dict(self) -> dict[str, float]: ...

    def load_state_dict(self, state: dict[str, float]) -> None: ...


class GRPOStage:
    """Plain GRPO: no probes, every trajectory kept, alpha = 0."""

    def explore(self, batch: StepBatch, step: int, metrics: StepMetrics) -> None:
        return None

    def filter_and_correct(self, batch: StepBatch) -> tuple[StepBatch, float, dict[str, float]]:
        return batch, 0.0, {}

    def state_dict(self) -> dict[str, float]:
        return {}

    def load_state_dict(self, state: dict[str, float]) -> None:
        return None


def probes_kept_per_rank(scores_by_rank: Sequence[Sequence[float]], budget: int) -> list[int]:
    """How many probes each rank keeps under one global top-`budget`: [world] counts.

    scores_by_rank[r] holds rank r's probe scores in its batch order. The global order is score descending,
    ties by (rank, position): the same order every rank's local stable sort (`select_trajectories`) gives
    within itself, so keeping its count of best probes keeps exactly the global top-`budget`.
    """
    if not isinstance(budget, (int, np.integer)) or budget < 0:
        raise ValueError(f"budget: expected a non-negative integer, got {budget!r}")
    flat = [(-float(s), r, i) for r, scores in enumerate(scores_by_rank) for i, s in enumerate(scores)]
    if any(math.isnan(s) for s, _, _ in flat):
        raise ValueError("scores_by_rank: NaN probe score; expected finite mean prompt log-probs")
    counts = [0] * len(scores_by_rank)
    for _, r, _ in sorted(flat)[:budget]:
        counts[r] += 1
    return counts


def keep_globally_best_probes(is_probe: np.ndarray, scores: np.ndarray, budget: int) -> np.ndarray:
    """Indices of this rank's kept trajectories -> int64 [K]: every original, then its probes among the
    global top-`budget` of all ranks' probes (`probes_kept_per_rank`). is_probe [B] bool, scores [B] float.
    Collective (gathers the probe scores)."""
    from rexrag_fast.rexrag import select_trajectories

    mine = probes_kept_per_rank(du.gather_objects(scores[is_probe].tolist()), budget)[du.get_rank()]
    return select_trajectories(is_probe, scores, mine)


def _source_group_rewards(batch: StepBatch) -> list[float]:
    """Per trajectory of `batch`, the mean reward of the originals in its group (its source group for a probe)."""
    sums: dict[int, list[float]] = {}
    for g, r, p in zip(batch.group_ids, batch.rewards, batch.is_probe):
        if not p:
            sums.setdefault(int(g), []).append(float(r))
    return [float(np.mean(sums[int(g)])) if int(g) in sums else 0.0 for g in batch.group_ids]


def _explore_masks(batch: StepBatch) -> list[torch.Tensor]:
    return [torch.tensor([c == Component.EXPLORE_PROMPT for c in t.components]) for t in batch.trajs]


class RexRagStage:
    """REX-RAG's mixed sampling and policy correction (see the module docstring).

    engine, retriever, tokenizer: the rollout's; agent_config(seed) -> AgentConfig gives the probes' limits."""

    def __init__(self, cfg: Config, *, engine: Any, retriever: Any, tokenizer: Any,
                 agent_config: Any) -> None:
        from rexrag_fast.rexrag import KeepRatio, PromptTrie, resolve_prompt_pool, tokenize_prompts

        rx = cfg.algorithm.rexrag
        self.cfg = cfg
        self.engine, self.retriever, self.tokenizer = engine, retriever, tokenizer
        self.agent_config: Any = agent_config  # (seed) -> AgentConfig
        self.keep_ratio = KeepRatio(rx.keep_ratio, rx.keep_ratio_ewm_alpha)
        self.pool_ids = tokenize_prompts(resolve_prompt_pool(rx.prompt_pool), tokenizer)
        self.trie = PromptTrie(self.pool_ids)

    def state_dict(self) -> dict[str, float]:
        return {"keep_ratio_ewm": self.keep_ratio.value}

    def load_state_dict(self, state: dict[str, float]) -> None:
        if state.get("keep_ratio_ewm") is not None:
            self.keep_ratio.value = float(state["keep_ratio_ewm"])

    def explore(self, batch: StepBatch, step: int, metrics: StepMetrics) -> None:
        """Probes of the originals of `batch`, appended to it in place with their rewards."""
        from rexrag_fast.rexrag.probes import make_probes, run_probes

        cfg = self.cfg
        seed, rank = cfg.trainer.seed, du.get_rank()
        rng = np.random.default_rng(derive_seed(seed, step, rank, SEED_PROBE_DRAWS))
        pb = make_probes(batch.trajs, batch.rewards, self.pool_ids, cfg.algorithm.rexrag.revision_prob, rng,
                         self.tokenizer, max_turns=cfg.rollout.max_turns)
        metrics.add("count/probes_made", len(pb.probes))
        if not pb.probes:
            return
        counters = self.engine.counters
        gen0, cached0 = counters.generated_tokens, counters.cached_tokens
        agent: AgentConfig = self.agent_config(derive_seed(seed, step, rank, SEED_PROBE_ROLLOUT))
        with metrics.timer("time/probe_s"):
            probes = run_probes(self.engine, self.retriever, pb.probes, agent, tokenizer=self.tokenizer)
        metrics.add("count/probe_generated_tokens", counters.generated_tokens - gen0)
        metrics.add("count/probe_cached_tokens", counters.cached_tokens - cached0)
        metrics.add("count/probe_tokens", sum(len(p) for p in probes))
        for p, src in zip(probes, pb.sources.tolist()):
            batch.add_probe(p, src)

    def filter_and_correct(self, batch: StepBatch) -> tuple[StepBatch, float, dict[str, float]]:
        """(kept batch with probe_logprobs, alpha, rexrag/* metrics, the same on every rank). Collective."""
        from rexrag_fast.rexrag import keep_probe_count, prompt_mean_logprobs
        from rexrag_fast.rexrag.probe_distribution import MIN_ERROR_RATE, probe_logprobs

        cfg = self.cfg
        world = du.get_world_size()
        ids = [t.token_ids for t in batch.trajs]
        whole = pack_sequences(ids, {"old_logprobs": batch.old_logprobs, "explore": _explore_masks(batch)})
        scores = prompt_mean_logprobs(whole.per_token["old_logprobs"], whole.cu_seqlens, whole.per_token["explore"])
        budget = keep_probe_count(self.keep_ratio.value, cfg.data.train_batch_size, cfg.rollout.n_agent, world)
        kept = batch.subset(keep_globally_best_probes(np.array(batch.is_probe, dtype=bool), scores, budget).tolist())
        probe = np.array(kept.is_probe, dtype=bool)
        r = np.array(kept.rewards, dtype=np.float64)
        source = np.array(_source_group_rewards(kept), dtype=np.float64)
        tot = du.sum_across_ranks({
            "orig": float((~probe).sum()), "orig_right": float((r[~probe] >= 1).sum()),
            "dead_ends": float((r[~probe] < 1).sum()),
            "probes": float(probe.sum()), "probes_right": float((r[probe] >= 1).sum()),
            "probe_reward": float(r[probe].sum()), "source_reward": float(source[probe].sum()),
        })
        err = max(1.0 - tot["orig_right"] / max(tot["orig"], 1.0), MIN_ERROR_RATE)
        alpha = tot["probes"] / max(tot["orig"] + tot["probes"], 1.0)
        accuracy = tot["probes_right"] / tot["probes"] if tot["probes"] > 0 else 0.0
        # dead_ends: originals with reward < 1 (the candidates a probe is forked from)
        m = {"rexrag/dead_ends": tot["dead_ends"], "rexrag/alpha": alpha, "rexrag/error_rate": err,
             "rexrag/probe_accuracy": accuracy,
             "rexrag/probes_kept": tot["probes"], "rexrag/keep_ratio": self.keep_ratio.value,
             "rexrag/probe_budget": float(budget),
             # kept probes' mean reward vs the mean original reward of the groups they were forked from
             "rexrag/kept_probe_reward": tot["probe_reward"] / tot["probes"] if tot["probes"] > 0 else 0.0,
             "rexrag/kept_probe_source_group_reward":
                 tot["source_reward"] / tot["probes"] if tot["probes"] > 0 else 0.0}
        if probe.any():
            kids = [t.token_ids for t in kept.trajs]
            pack = pack_sequences(kids, {"old_logprobs": kept.old_logprobs, "explore": _explore_masks(kept)})
            log_mu = probe_logprobs(pack.per_token["old_logprobs"], pack.cu_seqlens.long(), pack.input_ids,
                                    pack.per_token["explore"], torch.tensor([t.prompt_len for t in kept.trajs]),
                                    self.trie, err)
            kept.probe_logprobs = list(torch.split(log_mu, [len(x) for x in kids]))
        else:
            kept.probe_logprobs = [torch.full((len(t),), -math.inf) for t in kept.trajs]
        # The EMA folds this step's kept-probe accuracy in after filtering with the previous value.
        self.keep_ratio.update(accuracy)
        return kept, alpha, m


def build_exploration(cfg: Config, **rollout: Any) -> ExplorationStage:
    """RexRagStage for algorithm.name = rexrag (rollout = engine, retriever, tokenizer, agent_config), else
    GRPOStage."""
    return RexRagStage(cfg, **rollout) if cfg.algorithm.name == "rexrag" else GRPOStage()
