"""QA datasets: Search-R1 parquet files, FlashRAG-style JSONL files and the embedded world's splits.

Every loader returns a list of `QAExample`, keeping `data_source` (nq, triviaqa, popqa, hotpotqa,
2wikimultihopqa, musique, bamboogle, ...) so evaluation can score each benchmark separately.

Search-R1 parquet rows (scripts/data_process/*.py) hold: data_source, prompt ([{"role", "content"}] with
the instruction template already applied), ability, reward_model {"style", "ground_truth": {"target":
[answers]}}, extra_info {"split", "index"}, and usually the source columns id, question, golden_answers.
FlashRAG JSONL rows hold id, question, golden_answers (and sometimes metadata); their data_source is the
row's "data_source" if present, else the caller's, else the dataset directory's name (FlashRAG keeps
<dataset>/<split>.jsonl) or the file's stem.

A prompt column is used as the ready prompt (`QAExample.messages`) only when it already holds the
instruction (it mentions <search> or <answer>, as Search-R1's template does); a prompt holding a bare
question (the embedded world's files) is read as the question, and the agent applies the template.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

_SPLIT_NAMES = frozenset({"train", "test", "dev", "val", "valid", "validation"})


@dataclass
class QAExample:
    """One question with its golden answers; `messages` is the ready prompt when the file provides one."""

    id: str
    question: str
    golden_answers: list[str]
    data_source: str
    messages: list[dict[str, str]] | None = None
    extra: dict[str, Any] = field(default_factory=dict)


def _as_list(value: Any) -> list[Any]:
    if value is None:
        return []
    if isinstance(value, str):
        return [value]
    if hasattr(value, "tolist"):  # numpy arrays from parquet
        value = value.tolist()
    return list(value)


def _golden_answers(row: dict[str, Any], where: str) -> list[str]:
    gt = (row.get("reward_model") or {}).get("ground_truth") if isinstance(row.get("reward_model"), dict) else None
    answers: list[Any] = []
    if isinstance(gt, dict) and gt.get("target") is not None:
        answers = _as_list(gt["target"])
    if not answers:
        for key in ("golden_answers", "answers", "answer", "target"):
            if row.get(key) is not None:
                answers = _as_list(row[key])
                break
    answers = [str(a) for a in answers if a is not None and str(a).strip()]
    if not answers:
        raise ValueError(f"{where}: no golden answers (looked for reward_model.ground_truth.target, "
                         f"golden_answers, answers, answer, target); keys: {sorted(row)}")
    return answers


def _is_instruction(messages: list[dict[str, str]]) -> bool:
    """Whether a prompt already carries the agent instruction (it names the action tags)."""
    return any("<search>" in m["content"] or "<answer>" in m["content"] for m in messages)


def _question_from_messages(messages: list[dict[str, str]]) -> str:
    text = messages[-1]["content"]
    marker = "Question:"
    return text.rsplit(marker, 1)[1].strip() if marker in text else text.strip()


def example_from_row(row: dict[str, Any], default_source: str, where: str) -> QAExample:
    """One `QAExample` from a parquet or JSONL row (see the module docstring for the accepted fields)."""
    messages = None
    if row.get("prompt") is not None and not isinstance(row["prompt"], str):
        messages = [{"role": str(m["role"]), "content": str(m["content"])} for m in _as_list(row["prompt"])]
        if not messages:
            messages = None
    question = row.get("question")
    if messages is not None and not _is_instruction(messages):
        # A bare question in the prompt column (the embedded world writes these): the agent wraps it.
        question = question or messages[-1]["content"]
        messages = None
    if not question:
        if messages is None:
            raise ValueError(f"{where}: row has neither 'question' nor 'prompt'; keys: {sorted(row)}")
        question = _question_from_messages(messages)
    extra_info = row.get("extra_info") if isinstance(row.get("extra_info"), dict) else {}
    ex_id = row.get("id")
    if ex_id is None:
        ex_id = extra_info.get("index", where)
    extra = {k: v for k, v in row.items() if k in ("metadata", "extra_info", "ability")}
    return QAExample(
        id=str(ex_id),
        question=str(question),
        golden_answers=_golden_answers(row, where),
        data_source=str(row.get("data_source") or default_source),
        messages=messages,
        extra=extra,
    )


def _default_source(path: Path) -> str:
    stem = path.name.split(".")[0]
    return path.parent.name if stem.lower() in _SPLIT_NAMES and path.parent.name else stem


def load_parquet(path: str | Path, data_source: str | None = None) -> list[QAExample]:
    """Examples from a Search-R1 parquet file (rows as written by its data_process scripts)."""
    import pyarrow.parquet as pq

    path = Path(path)
    rows = pq.read_table(path).to_pylist()
    default = data_source or _default_source(path)
    return [example_from_row(r, default, f"{path}:row {i}") for i, r in enumerate(rows)]


def load_jsonl(path: str | Path, data_source: str | None = None) -> list[QAExample]:
    """Examples from a JSONL file (FlashRAG: id, question, golden_answers; Search-R1 fields also read)."""
    path = Path(path)
    default = data_source or _default_source(path)
    out = []
    with path.open(encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}:{lineno}: not valid JSON ({e.msg})") from None
            if not isinstance(row, dict):
                raise ValueError(f"{path}:{lineno}: expected a JSON object, got {type(row).__name__}")
            out.append(example_from_row(row, default, f"{path}:{lineno}"))
    return out


def load_qa(path: str | Path, data_source: str | None = None, limit: int | None = None) -> list[QAExample]:
    """Examples from a .parquet, .jsonl or .json (a list of rows) file, the first `limit` if given."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no QA data file at {path}")
    suffix = path.suffix.lower()
    if suffix == ".parquet":
        data = load_parquet(path, data_source)
    elif suffix == ".jsonl":
        data = load_jsonl(path, data_source)
    elif suffix == ".json":
        rows = json.loads(path.read_text(encoding="utf-8"))
        if not isinstance(rows, list):
            raise ValueError(f"{path}: a .json QA file must hold a list of rows, got {type(rows).__name__}")
        default = data_source or _default_source(path)
        data = [example_from_row(r, default, f"{path}:row {i}") for i, r in enumerate(rows)]
    else:
        raise ValueError(f"{path}: unknown QA file type {suffix!r} (expected .parquet, .jsonl or .json)")
    return data if limit is None else data[:limit]


def load_many(paths: Iterable[str | Path], limit_per_file: int | None = None) -> list[QAExample]:
    """Concatenated examples of several files (e.g. the seven benchmarks' test sets)."""
    out: list[QAExample] = []
    for p in paths:
        out.extend(load_qa(p, limit=limit_per_file))
    return out


def load_world_split(split: str = "test", world_dir: str | Path | None = None) -> list[QAExample]:
    """The embedded world's `split` ("train" or "test") from its Search-R1 parquet file.

    world_dir defaults to rexrag_fast.data.world.default_world_dir() (generated on first use).
    """
    if split not in ("train", "test"):
        raise ValueError(f"the embedded world has splits 'train' and 'test', got {split!r}")
    if world_dir is None:
        from rexrag_fast.data.world import default_world_dir

        world_dir = default_world_dir()
    world_dir = Path(world_dir)
    for name in (f"{split}.parquet", f"{split}.jsonl"):
        if (world_dir / name).is_file():
            return load_qa(world_dir / name)
    raise FileNotFoundError(f"no {split}.parquet or {split}.jsonl in the world directory {world_dir}")
