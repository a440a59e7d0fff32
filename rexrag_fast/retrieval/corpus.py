"""Search-R1 corpus files: JSONL rows {"id": ..., "contents": "\"Title\"\\ntext"}, read as a stream.

A 21M-row corpus (wiki-18) is never loaded whole: `scan_corpus` makes one pass that yields the sha256 and the
byte offset of every row (with a progress bar and ETA over the bytes), `file_sha256` re-hashes any file the same
way, `iter_corpus_chunks` streams rows in fixed-size chunks, and `DocStore` fetches rows by index with positioned
reads (os.pread, safe from many threads) using the saved offsets.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
from array import array
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np


class CorpusFormatError(ValueError):
    """A corpus row is not a JSON object with a string "contents" and an "id"."""


def parse_row(line: bytes | str, where: str) -> dict[str, Any]:
    """Parse and check one corpus line; `where` ("path:line") goes into the error message."""
    try:
        row = json.loads(line)
    except json.JSONDecodeError as e:
        raise CorpusFormatError(f"{where}: not valid JSON ({e.msg} at column {e.colno})") from None
    if not isinstance(row, dict):
        raise CorpusFormatError(f"{where}: expected a JSON object with 'id' and 'contents', got "
                                f"{type(row).__name__}")
    if not isinstance(row.get("contents"), str):
        raise CorpusFormatError(f"{where}: 'contents' must be a string, got {row.get('contents')!r:.80}")
    if "id" not in row:
        raise CorpusFormatError(f"{where}: row has no 'id' (keys: {sorted(row)})")
    row["id"] = str(row["id"])
    return row


def byte_progress(total: int | None, desc: str, progress: bool = True, position: int | None = None) -> Any:
    """A tqdm bar counting bytes (KiB/MiB, rate and ETA); disabled when progress is False; `position`: its line
    when several bars run at once."""
    from tqdm import tqdm

    return tqdm(total=total, unit="B", unit_scale=True, unit_divisor=1024, desc=desc, disable=not progress,
                dynamic_ncols=True, mininterval=1.0, position=position)


def file_sha256(path: str | os.PathLike[str], progress: bool = False, desc: str | None = None,
                position: int | None = None, block_bytes: int = 1 << 22) -> str:
    """sha256 hex digest of a file, read in `block_bytes` blocks (progress: a tqdm bar over the bytes, with ETA)."""
    path = Path(path)
    digest = hashlib.sha256()
    with open(path, "rb") as f, \
            byte_progress(path.stat().st_size, desc or f"sha256 {path.name}", progress, position) as bar:
        while block := f.read(block_bytes):
            digest.update(block)
            bar.update(len(block))
    return digest.hexdigest()


def scan_corpus(path: str | os.PathLike[str], progress: bool = False) -> tuple[str, np.ndarray]:
    """One streaming pass over a corpus file.

    Returns (sha256 hex digest of the file's bytes, spans [N, 2] int64 of (start byte, end byte) per non-blank
    row, newline excluded). Memory: 16 bytes per row, never the text. progress: a tqdm bar over the bytes.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"corpus file not found: {path}")
    digest = hashlib.sha256()
    starts, ends = array("q"), array("q")
    offset = 0
    with open(path, "rb") as f, byte_progress(path.stat().st_size, f"scanning {path.name}", progress) as bar:
        for line in f:
            digest.update(line)
            stripped = line.rstrip(b"\r\n")
            if stripped.strip():
                starts.append(offset)
                ends.append(offset + len(stripped))
            offset += len(line)
            if offset - bar.n >= 1 << 24:  # tqdm.update per line would cost more than the hashing
                bar.update(offset - bar.n)
        bar.update(offset - bar.n)
    spans = np.empty((len(starts), 2), dtype=np.int64)
    spans[:, 0] = np.frombuffer(starts, dtype=np.int64) if len(starts) else 0
    spans[:, 1] = np.frombuffer(ends, dtype=np.int64) if len(ends) else 0
    return digest.hexdigest(), spans


def iter_corpus(path: str | os.PathLike[str]) -> Iterator[dict[str, Any]]:
    """Stream the rows of a corpus file (blank lines skipped), checking each."""
    with open(path, "rb") as f:
        for lineno, line in enumerate(f, 1):
            if line.strip():
                yield parse_row(line, f"{path}:{lineno}")


def iter_corpus_chunks(path: str | os.PathLike[str], chunk_size: int) -> Iterator[list[dict[str, Any]]]:
    """Stream rows in lists of `chunk_size` (the last one may be shorter)."""
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    chunk: list[dict[str, Any]] = []
    for row in iter_corpus(path):
        chunk.append(row)
        if len(chunk) == chunk_size:
            yield chunk
            chunk = []
    if chunk:
        yield chunk


class DocStore:
    """Rows of a corpus file by row index, read on demand with os.pread (thread-safe, no shared file position).

    `spans` [N, 2] are the (start, end) byte offsets from `scan_corpus`; they may be a read-only memmap.
    """

    def __init__(self, path: str | os.PathLike[str], spans: np.ndarray) -> None:
        if spans.ndim != 2 or spans.shape[1] != 2:
            raise ValueError(f"spans must have shape [N, 2], got {tuple(spans.shape)}")
        self.path = Path(path)
        self.spans = spans
        self._fd = os.open(self.path, os.O_RDONLY)

    def __len__(self) -> int:
        return int(self.spans.shape[0])

    def get(self, index: int) -> dict[str, Any]:
        """Row `index` as a dict with "id" (str) and "contents"."""
        if not 0 <= index < len(self):
            raise IndexError(f"document index {index} out of range [0, {len(self)})")
        start, end = (int(x) for x in self.spans[index])
        return parse_row(os.pread(self._fd, end - start, start), f"{self.path} row {index}")

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1

    def __del__(self) -> None:
        with contextlib.suppress(Exception):
            self.close()
