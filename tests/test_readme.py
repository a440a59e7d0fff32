"""The README's quick tour runs as written (real tokenizer, tiny random model, real retriever)."""

from __future__ import annotations

import re
from pathlib import Path

README = Path(__file__).resolve().parent.parent / "README.md"


def test_quick_tour_runs(capsys) -> None:
    text = README.read_text()
    tour = text.split("## Quick tour", 1)[1]
    code = re.search(r"```python\n(.*?)```", tour, re.S).group(1)
    exec(compile(code, "README.md quick tour", "exec"), {"__name__": "readme_tour"})
    out = capsys.readouterr().out
    assert "Doc 1(Title:" in out and "loss" in out
