"""SIGTERM / SIGINT -> checkpoint at the next step boundary, then a clean exit.

A signal handler only sets a flag; the trainer polls it between steps:

    with GracefulStop() as stop:
        for step in ...:
            train_step()
            if stop.requested_on_any_rank():       # collective: every rank calls it at the same point
                save_checkpoint(...); break

`requested_on_any_rank` all-reduces the flag (max), so when the launcher signals only some ranks, all ranks
still stop after the same step. A second SIGINT while waiting raises KeyboardInterrupt at once (the user
pressed Ctrl-C twice); a second SIGTERM is ignored, since the save is already on its way.
"""

from __future__ import annotations

import logging
import signal
import threading
from types import FrameType
from typing import Any

from rexrag_fast.train import distributed as dist_utils

log = logging.getLogger(__name__)


class GracefulStop:
    """Records SIGTERM/SIGINT instead of dying; restores the previous handlers on exit."""

    def __init__(self, signals: tuple[int, ...] = (signal.SIGTERM, signal.SIGINT)) -> None:
        self.signals = signals
        self.received: int | None = None
        self._previous: dict[int, Any] = {}

    def install(self) -> GracefulStop:
        if threading.current_thread() is not threading.main_thread():
            raise RuntimeError("GracefulStop must be installed from the main thread (Python delivers signals there)")
        for s in self.signals:
            self._previous[s] = signal.signal(s, self._handle)
        return self

    def uninstall(self) -> None:
        for s, handler in self._previous.items():
            signal.signal(s, handler)
        self._previous.clear()

    def __enter__(self) -> GracefulStop:
        return self.install()

    def __exit__(self, *exc: object) -> None:
        self.uninstall()

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        if self.received is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt
        if self.received is None:
            self.received = signum
            log.warning("received %s: saving a checkpoint at the end of this step, then exiting",
                        signal.Signals(signum).name)

    @property
    def requested(self) -> bool:
        """This process got a stop signal."""
        return self.received is not None

    def requested_on_any_rank(self) -> bool:
        """Some rank got a stop signal. Collective when a process group exists: call it on every rank."""
        return dist_utils.max_across_ranks(1.0 if self.requested else 0.0) > 0
