"""Turning retrieval results into the text the agent reads between <information> tags, as Search-R1 does.

A corpus row's "contents" is '"Title"\\ntext'. One result list becomes

    Doc 1(Title: "Title") text
    Doc 2(Title: "Other") text
    ...

(the title keeps its quotes, exactly as Search-R1's _passages2string writes it), one line per passage.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any


def split_contents(contents: str) -> tuple[str, str]:
    """'"Title"\\ntext' -> ('"Title"', 'text'): the first line, and the rest joined by newlines."""
    first, _, rest = contents.partition("\n")
    return first, rest


def format_passages(results: Sequence[dict[str, Any]]) -> str:
    """One query's results -> 'Doc i(Title: ...) text\\n' per passage.

    Each entry is {"document": {"id", "contents"}, "score"} (return_scores=True) or a bare document
    {"id", "contents"} (return_scores=False, Search-R1's response shape without scores).
    """
    lines = []
    for i, item in enumerate(results, 1):
        doc = item.get("document", item)
        title, text = split_contents(doc["contents"])
        lines.append(f"Doc {i}(Title: {title}) {text}\n")
    return "".join(lines)
