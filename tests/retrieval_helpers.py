"""Helpers shared by the retrieval tests."""

from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path


def write_corpus(path: Path, docs: Iterable[dict]) -> Path:
    """Write `docs` ({"id", "contents"} dicts) as a Search-R1 corpus JSONL at `path`; returns `path`."""
    with open(path, "w", encoding="utf-8") as f:
        for d in docs:
            f.write(json.dumps(d) + "\n")
    return path
