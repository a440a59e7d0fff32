"""Trajectory bookkeeping (components, loss mask, turns, fork) and packing into the trainer's batch."""

from __future__ import annotations

import math

import pytest
import torch

from rexrag_fast.agent.trajectory import Component, Trajectory, pad_trajectories
from rexrag_fast.train.packing import pack_trajectories


def _sample(prompt_len: int = 3, seed: int = 0) -> Trajectory:
    g = torch.Generator().manual_seed(seed)
    ids = lambda n: torch.randint(0, 100, (n,), generator=g).tolist()
    t = Trajectory.from_prompt(ids(prompt_len), meta={"q": seed})
    t.append(ids(4), Component.RESPONSE, [-0.5, -1.0, -0.25, -2.0])
    t.close_turn("search", "q", "stop")
    t.append(ids(5), Component.INFORMATION)
    t.open_turn()
    t.append(ids(2), Component.RESPONSE, [-0.1, -0.2])
    t.close_turn(None, "", "length")
    t.append(ids(3), Component.INVALID_MSG)
    t.open_turn()
    t.append(ids(3), Component.RESPONSE, [-0.3, -0.3, -0.3])
    t.close_turn("answer", "x", "stop")
    return t


def test_component_values_match_rex_rag() -> None:
    assert [int(c) for c in Component] == [0, 1, 3, 4, 5]


def test_masks_and_turns() -> None:
    t = _sample()
    t.check()
    assert len(t) == 3 + 4 + 5 + 2 + 3 + 3
    assert t.num_response_tokens == len(t) - 3
    mask = t.loss_mask
    assert mask == [c in (Component.RESPONSE, Component.EXPLORE_PROMPT) for c in t.components]
    assert sum(mask) == 9
    assert [(x.start, x.end, x.action) for x in t.turns] == [(3, 7, "search"), (12, 14, None), (17, 20, "answer")]
    # log-probs are zero off the response and finite everywhere
    assert all(lp == 0.0 for lp, m in zip(t.logprobs, mask) if not m)
    assert all(math.isfinite(lp) for lp in t.logprobs)


def test_append_validation() -> None:
    t = Trajectory.from_prompt([1, 2])
    with pytest.raises(ValueError, match="2 tokens but 1 log-probs"):
        t.append([3, 4], Component.RESPONSE, [0.0])
    with pytest.raises(ValueError, match="finite"):
        t.append([3], Component.RESPONSE, [float("nan")])
    with pytest.raises(ValueError, match="non-empty prompt"):
        Trajectory.from_prompt([])


@pytest.mark.parametrize("keep", [3, 5, 7, 9, 12, 13, 20])
def test_fork_keeps_prefix_and_reopens_cut_turn(keep: int) -> None:
    t = _sample()
    t.completion = object()
    t.answer, t.status = "x", "answer"
    child = t.fork(keep, [7, 8], meta={"probe": True})
    child.check()
    assert child.token_ids == t.token_ids[:keep] + [7, 8]
    assert child.components[-2:] == [Component.EXPLORE_PROMPT] * 2
    assert child.loss_mask[-2:] == [True, True]
    assert child.logprobs[:keep] == t.logprobs[:keep] and child.logprobs[-2:] == [0.0, 0.0]
    assert child.status == "running" and child.answer is None and child.completion is t.completion
    assert child.meta == {"q": 0, "probe": True}
    assert all(x.end <= keep for x in child.turns)
    cut = [x for x in t.turns if x.start < keep < x.end]
    assert child.turn_start == (cut[0].start if cut else keep)
    assert child.num_searches == sum(x.action == "search" for x in child.turns)
    # the parent is untouched
    assert len(t) == 20 and t.status == "answer"


def test_fork_bounds() -> None:
    t = _sample()
    with pytest.raises(ValueError, match=r"keep_tokens must be in \[3, 20\]"):
        t.fork(2)
    with pytest.raises(ValueError, match="keep_tokens"):
        t.fork(21)


def test_pack_contract() -> None:
    a, b = _sample(3, 0), _sample(5, 1)
    probe_b = [float(-i) for i in range(len(b))]
    packed = pack_trajectories([a, b], rewards=[1.0, 0.0], group_ids=[0, 0], probe_logprobs=[None, probe_b])
    tok, seq = packed.per_token, packed.per_sequence
    t_total = len(a) + len(b)
    assert packed.input_ids.shape == (t_total,) and packed.input_ids.dtype == torch.int64
    assert packed.cu_seqlens.tolist() == [0, len(a), t_total] and packed.cu_seqlens.dtype == torch.int32
    assert tok["response_mask"].dtype == torch.bool
    assert tok["response_mask"].tolist() == a.loss_mask + b.loss_mask
    assert tok["component_mask"].tolist() == a.components + b.components
    assert tok["old_logprobs"].dtype == torch.float32
    assert tok["old_logprobs"].tolist() == pytest.approx(a.logprobs + b.logprobs)
    assert torch.isneginf(tok["probe_logprobs"][: len(a)]).all()
    assert tok["probe_logprobs"][len(a) :].tolist() == probe_b
    assert packed.position_ids.tolist() == list(range(len(a))) + list(range(len(b)))
    assert seq["rewards"].tolist() == [1.0, 0.0] and seq["group_ids"].tolist() == [0, 0]
    with pytest.raises(ValueError, match=r"per_sequence\['rewards'\]: expected 2 values"):
        pack_trajectories([a, b], rewards=[1.0])
    with pytest.raises(ValueError, match="at least one"):
        pack_trajectories([])


def test_pad_layout_matches_pack() -> None:
    a, b = _sample(3, 0), _sample(6, 2)
    padded = pad_trajectories([a, b], pad_token_id=-7)
    packed = pack_trajectories([a, b])
    am = padded["attention_mask"]
    assert am.sum(1).tolist() == [len(a), len(b)]
    assert padded["input_ids"][am].tolist() == packed.input_ids.tolist()
    assert padded["response_mask"][am].tolist() == packed.per_token["response_mask"].tolist()
    assert not padded["response_mask"][~am].any()
    assert (padded["input_ids"][~am] == -7).all()
    assert padded["old_logprobs"][am].tolist() == packed.per_token["old_logprobs"].tolist()
