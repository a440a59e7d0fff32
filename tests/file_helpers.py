"""Shared by the tests of loaders that must refuse a bad file with a clear message."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest


def assert_refused(load: Callable[[Path], Any], path: Path, text: str, match: str,
                   error: type[Exception] = ValueError) -> None:
    """Write `text` to `path`; `load(path)` must raise `error` with a message matching `match`."""
    path.write_text(text)
    with pytest.raises(error, match=match):
        load(path)
