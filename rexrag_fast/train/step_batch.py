"""One rank's trajectories of one RL step, with what the loss needs per sequence.

`StepBatch` is the step's data as it flows through DESIGN.md's data flow: the rollout fills `trajs`, `golds`,
`rewards`, `group_ids`; REX-RAG appends probes (`is_probe`) and later keeps a subset; the log-prob passes fill
`old_logprobs`, `ref_logprobs` and `probe_logprobs` (one [L_i] tensor per trajectory, in the trajectories'
order). Packing into micro-batches is `train/packing.py`'s job (`pack_step_batch`).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

from rexrag_fast.agent.reward import exact_match
from rexrag_fast.agent.trajectory import Component, Trajectory
from rexrag_fast.train.metrics import StepMetrics


@dataclass
class StepBatch:
    """This rank's trajectories after rollout (and probes), with what the loss needs per sequence."""

    trajs: list[Trajectory]
    golds: list[list[str]]
    rewards: list[float]
    group_ids: list[int]
    is_probe: list[bool]
    old_logprobs: list[torch.Tensor] = field(default_factory=list)  # each [L_i]
    probe_logprobs: list[torch.Tensor] | None = None  # each [L_i]; None without REX-RAG correction
    ref_logprobs: list[torch.Tensor] | None = None

    @classmethod
    def originals(cls, trajs: list[Trajectory], golds: list[list[str]], group_ids: list[int]) -> StepBatch:
        """Finished original trajectories [N] with their golden answers and group ids; rewards = exact match."""
        if not len(trajs) == len(golds) == len(group_ids):
            raise ValueError(f"trajs, golds, group_ids: expected equal lengths, got {len(trajs)}, {len(golds)}, "
                             f"{len(group_ids)}")
        rewards = [exact_match(t.answer, g) for t, g in zip(trajs, golds)]
        return cls(list(trajs), list(golds), rewards, list(group_ids), [False] * len(trajs))

    def add_probe(self, probe: Trajectory, source: int) -> None:
        """Append `probe`, forked from trajectory `source`: it joins the source's group and golden answers."""
        self.trajs.append(probe)
        self.golds.append(self.golds[source])
        self.rewards.append(exact_match(probe.answer, self.golds[source]))
        self.group_ids.append(self.group_ids[source])
        self.is_probe.append(True)

    def subset(self, keep: Sequence[int]) -> StepBatch:
        """The trajectories `keep` (indices, in that order) with everything that belongs to them."""
        pick = lambda xs: None if xs is None else [xs[i] for i in keep]  # noqa: E731
        return StepBatch([self.trajs[i] for i in keep], pick(self.golds), pick(self.rewards), pick(self.group_ids),
                         pick(self.is_probe), pick(self.old_logprobs) or [], pick(self.probe_logprobs),
                         pick(self.ref_logprobs))

    def originals_only(self) -> list[int]:
        """Indices of the original (non-probe) trajectories."""
        return [i for i, p in enumerate(self.is_probe) if not p]

    def __len__(self) -> int:
        return len(self.trajs)

    # ---------------------------------------------------------------------------- what a step counts

    def count_rollout(self, m: StepMetrics) -> None:
        """Originals and their rewards, probes' rewards (before any filtering)."""
        orig = self.originals_only()
        m.add("count/originals", len(orig))
        m.add("count/rollout_tokens", sum(len(self.trajs[i]) for i in orig))
        m.add("sum/reward", sum(self.rewards[i] for i in orig))
        m.add("sum/probe_reward", sum(r for r, p in zip(self.rewards, self.is_probe) if p))

    def count_sampling_drift(self, m: StepMetrics) -> None:
        """|engine sampling log-prob - actor log-prob| summed over sampled tokens (temperature-scaled both):
        float noise when the engine runs the actor's weights, so it checks the weight sync."""
        for t, lp in zip(self.trajs, self.old_logprobs):
            sampled = torch.tensor(t.components) == Component.RESPONSE
            m.add("sum/rollout_logprob_abs_diff", float(((torch.tensor(t.logprobs) - lp).abs() * sampled).sum()))
            m.add("count/response_tokens_all", int(sampled.sum()))

    def count_train_batch(self, m: StepMetrics) -> None:
        """The kept batch's size, and the originals' searches, answers and response lengths."""
        m.add("count/train_tokens", sum(len(t) for t in self.trajs))
        m.add("count/train_sequences", len(self.trajs))
        orig = [self.trajs[i] for i in self.originals_only()]
        m.add("sum/searches", sum(t.num_searches for t in orig))
        m.add("sum/answered", sum(t.answer is not None for t in orig))
        m.add("sum/response_len", sum(t.num_response_tokens for t in orig))
