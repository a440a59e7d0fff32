"""Non-finite updates: skip an optimizer step whose loss or gradient is NaN/inf, stop after N in a row.

One NaN in the log-probs (or an overflow in the backward) makes the loss and every gradient NaN, and one
optimizer step with NaN gradients makes every weight NaN for the rest of the run. The actor tells the guard,
for each optimizer step, whether this rank's losses (and, where the actor sees it, the gradient norm) were
finite; the guard agrees on it with every rank (one all_reduce), so that all ranks skip the same steps and
stop together: under ZeRO-3 a rank that skipped alone would leave the others waiting in a collective.

    guard = FiniteGuard(cfg.actor.max_nonfinite_updates)
    ok = guard.agree(losses_finite)                 # collective; the same answer on every rank
    ... step the optimizer only when ok ...
    guard.record(ok and grad_norm_finite, where=..., what=...)  # warns; raises NonFiniteUpdateError at N
    metrics.update(guard.metrics())                 # actor/skipped_updates, actor/nonfinite_streak
"""

from __future__ import annotations

import logging
import math

from rexrag_fast.train import distributed as dist_utils

log = logging.getLogger(__name__)


class NonFiniteUpdateError(RuntimeError):
    """Too many optimizer steps in a row had a non-finite loss or gradient."""


class FiniteGuard:
    """Counts optimizer steps skipped for a non-finite loss or gradient; raises after `max_in_a_row` in a row.

    max_in_a_row: actor.max_nonfinite_updates (>= 1). A finite step resets the count.
    """

    def __init__(self, max_in_a_row: int) -> None:
        if max_in_a_row < 1:
            raise ValueError(f"max_in_a_row: expected >= 1, got {max_in_a_row}")
        self.max_in_a_row = max_in_a_row
        self.streak = 0  # non-finite steps in a row, over update calls
        self.skipped = 0  # since the last `metrics()` call
        self.bad_ranks: list[int] = []  # ranks whose loss was non-finite in the last `agree`

    def agree(self, locally_finite: bool) -> bool:
        """True when `locally_finite` is True on every rank. Collective: every rank calls it once per optimizer
        step."""
        flags = [0.0] * dist_utils.get_world_size()
        flags[dist_utils.get_rank()] = 0.0 if locally_finite else 1.0
        # one slot per rank: the sum is every rank's own flag
        self.bad_ranks = [r for r, f in enumerate(dist_utils.all_reduce_floats(flags)) if f]
        return not self.bad_ranks

    def record(self, finite: bool, *, where: str, what: str = "") -> None:
        """Note one optimizer step's outcome (the same on every rank). Non-finite: log a warning (rank 0) and
        raise NonFiniteUpdateError once `max_in_a_row` such steps came in a row.

        where: where the run is, for the messages (e.g. "RL step 12, optimizer step 3 of 4").
        what: what was not finite (e.g. "ranks [1]", "gradient norm nan").
        """
        if finite:
            self.streak = 0
            return
        self.streak += 1
        self.skipped += 1
        detail = f" ({what})" if what else ""
        if self.streak >= self.max_in_a_row:
            raise NonFiniteUpdateError(
                f"{where}: {self.streak} optimizer steps in a row had a non-finite loss or gradient{detail}; "
                f"stopping (actor.max_nonfinite_updates = {self.max_in_a_row}). Look for NaN/inf in the "
                "log-probs, rewards or weights, or lower actor.lr")
        if dist_utils.is_main():
            log.warning("%s: non-finite loss or gradient%s; update skipped (%d in a row, the run stops at %d = "
                        "actor.max_nonfinite_updates)", where, detail, self.streak, self.max_in_a_row)

    def metrics(self) -> dict[str, float]:
        """actor/skipped_updates (since the last call) and actor/nonfinite_streak; resets the skip count."""
        out = {"actor/skipped_updates": float(self.skipped), "actor/nonfinite_streak": float(self.streak)}
        self.skipped = 0
        return out


def is_finite(value: float | None) -> bool:
    """False for NaN and +-inf; None (nothing measured) counts as finite."""
    return value is None or math.isfinite(value)
