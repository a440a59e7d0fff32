"""Where rexrag-fast keeps files it can rebuild: the embedded world, converted tokenizers, built indexes."""

from __future__ import annotations

import os
from pathlib import Path


def default_cache_dir() -> Path:
    """$REXRAG_CACHE, else ~/.cache/rexrag_fast."""
    env = os.environ.get("REXRAG_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "rexrag_fast"
