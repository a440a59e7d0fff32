"""Dead-end selection: which answered trajectories get a probe.

As in MiliLab/REX-RAG (search_r1/llm_agent/generation.py `execute_predictions`): when an original trajectory
answers and its exact-match reward is below 1, it is probed when a uniform integer u in {0, ..., 100}
satisfies u < revision_prob. The draw is made only for such candidates, in batch order. Probes are never
probed again, nothing is probed during evaluation, and an answer given in the final, search-free turn
(after max_turns) is not probed because no turn is left to continue in.

Because u has 101 values, the chance of a probe is #{u < revision_prob} / 101 (e.g. 20/101 for the training
script's revision_prob = 20), not revision_prob / 100; `dead_end_probability` gives it exactly.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

# u is drawn from {0, ..., REVISION_DRAW_MAX}, inclusive at both ends (Python's random.randint(0, 100)).
REVISION_DRAW_MAX = 100


def _check_revision_prob(revision_prob: float) -> float:
    if not isinstance(revision_prob, (int, float)) or not math.isfinite(revision_prob):
        raise ValueError(f"revision_prob: expected a finite percentage, got {revision_prob!r}")
    if not 0 <= revision_prob <= REVISION_DRAW_MAX:
        raise ValueError(f"revision_prob: expected a percentage in [0, 100], got {revision_prob}")
    return float(revision_prob)


def dead_end_probability(revision_prob: float) -> float:
    """P(u < revision_prob) for u uniform on {0, ..., 100}: the chance a failed original is probed."""
    p = _check_revision_prob(revision_prob)
    return math.ceil(p) / (REVISION_DRAW_MAX + 1)


def _array(name: str, x: Any, size: int | None, kind: str) -> np.ndarray:
    a = x.detach().cpu().numpy() if hasattr(x, "detach") else np.asarray(x)
    if a.ndim != 1 or (size is not None and a.shape[0] != size):
        want = "1-D" if size is None else f"shape [{size}]"
        raise ValueError(f"{name}: expected {want}, got shape {list(a.shape)}")
    if kind == "bool" and a.dtype != np.bool_:
        raise TypeError(f"{name}: expected booleans, got dtype {a.dtype}")
    if kind == "float":
        a = a.astype(np.float64)
        if not np.isfinite(a).all():
            raise ValueError(f"{name}: expected finite rewards, got {a[~np.isfinite(a)][:4].tolist()}")
    return a


def select_dead_ends(
    rewards: Any,
    is_original: Any,
    revision_prob: float,
    rng: np.random.Generator,
    *,
    training: bool = True,
    can_continue: Any = None,
) -> np.ndarray:
    """Which trajectories to probe -> bool [B].

    rewards [B]: exact-match reward of each trajectory's answer; is_original [B] bool (False for probes);
    revision_prob: percentage in [0, 100]; rng: a seeded numpy Generator (one integer drawn per candidate);
    training: False in evaluation (nothing probed, nothing drawn); can_continue [B] bool or None: False
    where the answer came in the final turn, leaving no turn for a probe (None: every answer may be probed).

        probe[b] = training and is_original[b] and can_continue[b] and rewards[b] < 1 and u_b < revision_prob
    """
    r = _array("rewards", rewards, None, "float")
    size = r.shape[0]
    original = _array("is_original", is_original, size, "bool")
    cont = np.ones(size, dtype=bool) if can_continue is None else _array("can_continue", can_continue, size, "bool")
    threshold = _check_revision_prob(revision_prob)
    probe = np.zeros(size, dtype=bool)
    if not training:
        return probe
    candidates = np.flatnonzero(original & cont & (r < 1.0))
    if candidates.size:
        draws = rng.integers(0, REVISION_DRAW_MAX + 1, size=candidates.size)
        probe[candidates[draws < threshold]] = True
    return probe
