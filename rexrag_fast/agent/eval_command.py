"""`rexrag-fast eval`: run the Search-R1 agent over QA files and report EM / F1 per data_source.

    rexrag-fast eval --model DIR|smollm2|tiny --data FILE [FILE ...] --retriever URL|DIR|world [--n N] [--json out.json]

--model: a Hugging Face checkpoint directory (e.g. Qwen2.5-3B-Instruct), "smollm2" (the embedded
    SmolLM2-135M-Instruct) or "tiny" (a tiny random Qwen2 sharing SmolLM2's tokenizer, for smoke runs).
--data: Search-R1 parquet or FlashRAG JSONL files (the seven benchmarks: nq, triviaqa, popqa, hotpotqa,
    2wikimultihopqa, musique, bamboogle), or "world" / "world:train" for the embedded world's sets.
--retriever: a Search-R1 retrieval server URL (http://host:port/retrieve), an index directory, a world
    directory (its corpus is indexed on first use), or "world" (the embedded world).

Scores: per data_source the mean EM and F1 over its examples; "average" is the unweighted mean over
data sources (how the paper averages benchmarks); "overall" the mean over all examples. Decoding is
greedy by default (--temperature 0), as in Search-R1's validation.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from rexrag_fast.agent.loop import AgentConfig, run_agent_loop
from rexrag_fast.agent.reward import exact_match, f1_score
from rexrag_fast.agent.template import DEFAULT_TEMPLATE, encode_prompt


@dataclass
class EvalRecord:
    """One scored example."""

    id: str
    data_source: str
    question: str
    golden_answers: list[str]
    answer: str | None
    em: float
    f1: float
    status: str
    turns: int
    searches: int
    response_tokens: int


def summarize(records: Sequence[EvalRecord]) -> dict[str, Any]:
    """{"per_source": {src: {"n", "em", "f1"}}, "average": {"em", "f1"} (mean over sources),
    "overall": {"n", "em", "f1"} (mean over examples)}; sources sorted by name."""
    if not records:
        raise ValueError("summarize: no records to score")
    by_source: dict[str, list[EvalRecord]] = {}
    for r in records:
        by_source.setdefault(r.data_source, []).append(r)
    per_source = {
        src: {"n": len(rs), "em": sum(r.em for r in rs) / len(rs), "f1": sum(r.f1 for r in rs) / len(rs)}
        for src, rs in sorted(by_source.items())
    }
    return {
        "per_source": per_source,
        "average": {
            "em": sum(s["em"] for s in per_source.values()) / len(per_source),
            "f1": sum(s["f1"] for s in per_source.values()) / len(per_source),
        },
        "overall": {
            "n": len(records),
            "em": sum(r.em for r in records) / len(records),
            "f1": sum(r.f1 for r in records) / len(records),
        },
    }


def format_table(summary: dict[str, Any]) -> str:
    """A plain-text table: one row per data_source, then average and overall (EM/F1 in percent)."""
    rows = [(src, str(s["n"]), s["em"], s["f1"]) for src, s in summary["per_source"].items()]
    rows.append(("average", "", summary["average"]["em"], summary["average"]["f1"]))
    rows.append(("overall", str(summary["overall"]["n"]), summary["overall"]["em"], summary["overall"]["f1"]))
    width = max(len("data_source"), *(len(r[0]) for r in rows))
    lines = [f"{'data_source':<{width}}  {'n':>6}  {'EM':>6}  {'F1':>6}", "-" * (width + 24)]
    for name, n, em, f1 in rows:
        if name == "average":
            lines.append("-" * (width + 24))
        lines.append(f"{name:<{width}}  {n:>6}  {100 * em:6.2f}  {100 * f1:6.2f}")
    return "\n".join(lines)


def evaluate(
    engine: Any,
    retriever: Any,
    examples: Sequence[Any],
    config: AgentConfig,
    *,
    tokenizer: Any = None,
    batch_size: int = 64,
    template: str = DEFAULT_TEMPLATE,
    use_chat_template: bool = True,
    progress: bool = True,
) -> list[EvalRecord]:
    """Run the agent over `examples` (QAExample: question, golden_answers, data_source, messages) in
    batches of `batch_size` and score each final answer; returns [N] records in input order."""
    tokenizer = tokenizer if tokenizer is not None else engine.tokenizer
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=len(examples), desc="eval", unit="q")
    records: list[EvalRecord] = []
    for lo in range(0, len(examples), batch_size):
        batch = examples[lo : lo + batch_size]
        prompts = [
            encode_prompt(ex.question, tokenizer, messages=ex.messages, template=template,
                          use_chat_template=use_chat_template)
            for ex in batch
        ]
        trajs = run_agent_loop(engine, retriever, prompts, config, tokenizer=tokenizer)
        for ex, t in zip(batch, trajs):
            records.append(EvalRecord(
                id=ex.id, data_source=ex.data_source, question=ex.question, golden_answers=list(ex.golden_answers),
                answer=t.answer, em=exact_match(t.answer, ex.golden_answers), f1=f1_score(t.answer, ex.golden_answers),
                status=t.status, turns=len(t.turns), searches=t.num_searches, response_tokens=t.num_response_tokens,
            ))
        if bar is not None:
            bar.update(len(batch))
            bar.set_postfix(em=f"{sum(r.em for r in records) / len(records):.3f}")
    if bar is not None:
        bar.close()
    return records


# ---------------------------------------------------------------------------------------------- CLI
def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", required=True, help="checkpoint directory, 'smollm2' or 'tiny'")
    parser.add_argument("--data", required=True, nargs="+",
                        help="QA files (.parquet/.jsonl/.json), or 'world' / 'world:train'")
    parser.add_argument("--retriever", required=True, help="server URL, index or world directory, or 'world'")
    parser.add_argument("--n", type=int, default=None, help="first N examples of each data file")
    parser.add_argument("--json", type=Path, default=None, help="write scores and per-example results here")
    parser.add_argument("--max-turns", type=int, default=4)
    parser.add_argument("--topk", type=int, default=3)
    parser.add_argument("--max-obs-tokens", type=int, default=500)
    parser.add_argument("--max-tokens-per-turn", type=int, default=500)
    parser.add_argument("--max-response-tokens", type=int, default=4096)
    parser.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--batch-size", type=int, default=64, help="questions per agent-loop batch")
    parser.add_argument("--template", type=Path, default=None, help="file with an instruction template ({question})")
    parser.add_argument("--no-chat-template", action="store_true", help="do not apply the tokenizer's chat template")
    parser.add_argument("--num-blocks", type=int, default=None,
                        help="KV blocks of 16 tokens (default: the whole batch's worst case on CUDA, 2048 on CPU)")
    parser.add_argument("--max-num-seqs", type=int, default=64)
    parser.add_argument("--device", default=None, help="cpu / cuda (default: cuda when available)")
    parser.add_argument("--no-progress", action="store_true")


def load_model(spec: str, device: str | None = None) -> tuple[Any, Any]:
    """(model, tokenizer) for --model: a name of `train.models.MODEL_NAMES` or a checkpoint directory."""
    from rexrag_fast.train.models import load_model as load_named_model

    model, tokenizer = load_named_model(spec, dtype=None, key="--model")
    if device is not None:
        model = model.to(device)
    return model, tokenizer


def load_retriever(spec: str) -> Any:
    """The retriever for --retriever: an http(s) URL, 'world', a world directory or an index directory."""
    from rexrag_fast.retrieval.retriever import build_retriever

    return build_retriever(spec, check=False, key="--retriever")


def load_examples(specs: Sequence[str], n: int | None) -> list[Any]:
    """Examples of every --data entry (the first n of each when n is given)."""
    from rexrag_fast.data.datasets import load_qa, load_world_split

    out: list[Any] = []
    for spec in specs:
        if spec in ("world", "world:test", "world:train"):
            data = load_world_split("train" if spec == "world:train" else "test")
            out.extend(data if n is None else data[:n])
        else:
            out.extend(load_qa(spec, limit=n))
    return out


def run(args: argparse.Namespace) -> int:
    import torch

    from rexrag_fast.engine import EngineConfig, LLMEngine

    if args.n is not None and args.n < 1:
        raise SystemExit(f"--n must be >= 1, got {args.n}")
    config = AgentConfig(
        max_turns=args.max_turns, topk=args.topk, max_obs_tokens=args.max_obs_tokens,
        max_tokens_per_turn=args.max_tokens_per_turn, max_response_tokens=args.max_response_tokens,
        temperature=args.temperature, seed=args.seed,
    )
    template = args.template.read_text(encoding="utf-8") if args.template is not None else DEFAULT_TEMPLATE
    examples = load_examples(args.data, args.n)
    if not examples:
        raise SystemExit("no examples to evaluate")
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    model, tokenizer = load_model(args.model, device)
    retriever = load_retriever(args.retriever)
    block_size = 16
    num_blocks = args.num_blocks
    if num_blocks is None and device.startswith("cuda"):
        # worst case of every running sequence at once: a long prompt plus the whole response budget
        max_seq = min(config.max_response_tokens + 2048, getattr(model.config, "max_position_embeddings", 32768))
        num_blocks = min(args.max_num_seqs, args.batch_size) * (max_seq // block_size + 2)
    elif num_blocks is None:
        num_blocks = 2048  # the engine preempts when a CPU-sized pool runs out
    engine = LLMEngine(model, tokenizer=tokenizer, config=EngineConfig(
        num_blocks=num_blocks, block_size=block_size, max_num_seqs=args.max_num_seqs, device=device))
    records = evaluate(engine, retriever, examples, config, tokenizer=tokenizer, batch_size=args.batch_size,
                       template=template, use_chat_template=not args.no_chat_template,
                       progress=not args.no_progress)
    summary = summarize(records)
    print(format_table(summary))
    if args.json is not None:
        payload = {
            "model": args.model, "data": list(args.data), "retriever": args.retriever,
            "config": asdict(config), **summary, "examples": [asdict(r) for r in records],
        }
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(payload, indent=2, ensure_ascii=False), encoding="utf-8")
        print(f"wrote {args.json}", file=sys.stderr)
    return 0
