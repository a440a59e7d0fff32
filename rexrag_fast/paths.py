"""Where rexrag-fast keeps files it can rebuild: the embedded world, converted tokenizers, built indexes."""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path


def default_cache_dir() -> Path:
    """$REXRAG_CACHE, else ~/.cache/rexrag_fast."""
    env = os.environ.get("REXRAG_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "rexrag_fast"


def save_dir_atomically(target: Path, save: Callable[[str], object]) -> bool:
    """Run `save(tmp_dir)` then rename tmp_dir to `target`, so concurrent readers see the whole directory or
    none. Returns False (and keeps nothing) when another process saved `target` first or the cache is
    read-only; the caller then uses the object it already has in memory."""
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=f".{target.name}-", dir=target.parent)
    try:
        save(tmp)
        os.rename(tmp, target)
        return True
    except OSError:
        return False
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
