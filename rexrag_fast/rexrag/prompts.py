"""The pool of exploratory prompts that REX-RAG appends to a dead-end trajectory.

Each prompt opens a new `<think>` block that questions the reasoning so far; the policy then continues the
block on its own. A probe draws one prompt uniformly from the pool. The same token ids that are appended to
the probe are the ones the probe distribution's prefix trie is built from (`tokenize_prompts`), so the
inserted span of every probe is a path in that trie.

A user pool is a YAML or JSON file holding a plain list of strings, or a Python file whose first top-level
list or tuple literal (bare, or assigned to a name) is the pool: it is read with `ast.literal_eval`, never
executed, so a file copied from another project's source can be pointed at directly.
"""

from __future__ import annotations

import ast
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import yaml

THINK_OPEN = "<think>"

# Tags the agent loop parses as actions or observations: a prompt containing one would be read as an
# answer, a search, or a retrieved passage instead of as reasoning.
FORBIDDEN_TAGS = ("<answer>", "</answer>", "<search>", "</search>", "<information>", "</information>")

DEFAULT_EXPLORE_PROMPTS: tuple[str, ...] = (
    "<think> Wait, let me double-check whether my last conclusion is really supported.",
    "<think> Hold on, I may have accepted an assumption too quickly.",
    "<think> Let me step back: is the evidence I found actually about the right entity?",
    "<think> Before answering, I should ask whether another reading of the question fits better.",
    "<think> Something feels off; my reasoning may have skipped a step.",
    "<think> Let me reconsider: did the retrieved passages really say what I claimed?",
    "<think> I am not fully sure of this answer, so I should verify it.",
    "<think> Maybe I confused two similar names or facts earlier.",
    "<think> Let me re-read the question to make sure I answer what it asks.",
    "<think> My previous search may not have found the right information.",
    "<think> I should question the link I drew between these two facts.",
    "<think> Perhaps this question needs one more hop that I skipped.",
    "<think> Let me check whether another source would contradict my conclusion.",
    "<think> I relied on memory there; a search could confirm or correct it.",
    "<think> That answer came too fast; let me examine it again.",
    "<think> Is there a detail in the question that I ignored?",
    "<think> I might have picked the wrong candidate among several options.",
    "<think> Let me rethink this from the beginning with a fresh view.",
    "<think> The information I gathered might be incomplete for this question.",
    "<think> I should test my answer against every condition in the question.",
    "<think> Could a date, place or name in my reasoning be mistaken?",
    "<think> Let me look for the weakest step in the chain I built.",
    "<think> Maybe a more specific search query would lead to a better answer.",
    "<think> I doubt my earlier inference; let me revisit it.",
    "<think> Let me make sure I did not mix up who did what to whom.",
    "<think> The passages may describe a different person with the same name.",
    "<think> Before committing, I want to see if my answer fits all the evidence.",
    "<think> Perhaps I read the retrieved text too loosely.",
    "<think> I may need to verify the intermediate fact before the final one.",
    "<think> Let me pause and consider what is still uncertain here.",
)


def validate_prompts(prompts: Any, source: str = "prompts") -> tuple[str, ...]:
    """Check a prompt pool and return it as a tuple of strings.

    A valid pool is a non-empty list of distinct, non-blank strings, each starting with `<think>` (after
    leading whitespace) and containing none of the agent's action/observation tags. `source` names the
    pool in error messages (e.g. the file it came from).
    """
    if isinstance(prompts, (str, bytes)) or not isinstance(prompts, Sequence):
        raise ValueError(f"{source}: expected a list of prompt strings, got {type(prompts).__name__}")
    if len(prompts) == 0:
        raise ValueError(f"{source}: expected at least one prompt, got an empty list")
    seen: dict[str, int] = {}
    for i, prompt in enumerate(prompts):
        if not isinstance(prompt, str):
            raise ValueError(f"{source}[{i}]: expected a string, got {type(prompt).__name__} {prompt!r}")
        if not prompt.strip():
            raise ValueError(f"{source}[{i}]: expected a non-blank prompt, got {prompt!r}")
        if not prompt.lstrip().startswith(THINK_OPEN):
            raise ValueError(f"{source}[{i}]: expected a prompt opening a new {THINK_OPEN!r} block, got {prompt!r}")
        for tag in FORBIDDEN_TAGS:
            if tag in prompt:
                raise ValueError(
                    f"{source}[{i}]: the tag {tag!r} is parsed by the agent loop and cannot appear in an "
                    f"exploratory prompt: {prompt!r}"
                )
        if prompt in seen:
            raise ValueError(f"{source}[{i}]: duplicate of {source}[{seen[prompt]}]: {prompt!r}")
        seen[prompt] = i
    return tuple(prompts)


def load_prompt_pool(path: str | Path) -> tuple[str, ...]:
    """Read a user pool from a `.yaml`/`.yml` or `.json` file holding a list of strings, or a `.py` file
    holding a list literal (`_literal_list_in_python`), validated."""
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix not in (".yaml", ".yml", ".json", ".py"):
        raise ValueError(f"prompt pool {path}: expected a .yaml, .yml, .json or .py file, got suffix {suffix!r}")
    if not path.is_file():
        raise FileNotFoundError(f"prompt pool {path}: no such file")
    text = path.read_text(encoding="utf-8")
    if suffix == ".py":
        return validate_prompts(_literal_list_in_python(text, path), source=str(path))
    try:
        data = json.loads(text) if suffix == ".json" else yaml.safe_load(text)
    except (json.JSONDecodeError, yaml.YAMLError) as err:
        raise ValueError(f"prompt pool {path}: cannot parse {suffix[1:].upper()}: {err}") from err
    return validate_prompts(data, source=str(path))


def _literal_list_in_python(text: str, path: Path) -> list[Any]:
    """The first top-level list/tuple literal of Python source `text` (an expression statement or the value
    of an assignment), evaluated with ast.literal_eval: the file is parsed, never run."""
    try:
        tree = ast.parse(text, filename=str(path))
    except SyntaxError as err:
        raise ValueError(f"prompt pool {path}: not valid Python: {err}") from err
    for node in tree.body:
        value = node.value if isinstance(node, (ast.Assign, ast.AnnAssign, ast.Expr)) else None
        if isinstance(value, (ast.List, ast.Tuple)):
            try:
                return list(ast.literal_eval(value))
            except ValueError as err:
                raise ValueError(f"prompt pool {path}: line {value.lineno}: the list must be a literal of "
                                 f"strings ({err})") from err
    raise ValueError(f"prompt pool {path}: no top-level list or tuple literal found")


def resolve_prompt_pool(path: str | Path | None = None) -> tuple[str, ...]:
    """The user pool at `path`, or `DEFAULT_EXPLORE_PROMPTS` when `path` is None or empty."""
    if path is None or str(path) == "":
        return DEFAULT_EXPLORE_PROMPTS
    return load_prompt_pool(path)


def tokenize_prompts(prompts: Sequence[str], tokenizer: Any) -> list[list[int]]:
    """Token ids of each prompt, without special tokens: exactly what a probe appends after its prefix.

    `tokenizer` is a Hugging Face tokenizer (anything with `__call__(text, add_special_tokens=False)`
    returning `{"input_ids": [...]}`).
    """
    prompts = validate_prompts(list(prompts))
    token_ids = [list(tokenizer(p, add_special_tokens=False)["input_ids"]) for p in prompts]
    for i, ids in enumerate(token_ids):
        if not ids:
            raise ValueError(f"prompts[{i}]: the tokenizer produced no tokens for {prompts[i]!r}")
    return token_ids


def sample_prompt_indices(rng: np.random.Generator, count: int, pool_size: int) -> np.ndarray:
    """`count` prompt indices drawn uniformly with replacement from `range(pool_size)` -> int64 [count]."""
    if pool_size < 1:
        raise ValueError(f"pool_size: expected at least 1, got {pool_size}")
    if count < 0:
        raise ValueError(f"count: expected a non-negative number of draws, got {count}")
    return rng.integers(0, pool_size, size=count, dtype=np.int64)
