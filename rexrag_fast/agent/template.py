"""The Search-R1 instruction template and the chat wrapping of the first prompt.

Search-R1 (scripts/data_process/nq_search.py, template_type "base") puts the whole protocol in one user
message: reason in <think>, search with <search> query </search>, read <information>, answer with
<answer> ... </answer>. The question is stripped and gets a trailing "?" when it has none. verl's dataset
then renders that message with the tokenizer's chat template (add_generation_prompt=True) when the
tokenizer has one, and uses the bare text otherwise; `encode_prompt` does the same.
"""

from __future__ import annotations

from typing import Any

SEARCH_R1_TEMPLATE = (
    "Answer the given question. "
    "You must conduct reasoning inside <think> and </think> first every time you get new information. "
    "After reasoning, if you find you lack some knowledge, you can call a search engine by <search> query "
    "</search> and it will return the top searched results between <information> and </information>. "
    "You can search as many times as your want. "
    "If you find no further external knowledge needed, you can directly provide the answer inside <answer> "
    "and </answer>, without detailed illustrations. For example, <answer> Beijing </answer>. "
    "Question: {question}\n"
)
"""Search-R1's "base" instruction text (its typos kept: prompts must match the reference token for token)."""


def format_question(question: str) -> str:
    """Search-R1's question clean-up: strip, then end with "?" if it does not already."""
    if not isinstance(question, str) or not question.strip():
        raise ValueError(f"question must be a non-empty string, got {question!r}")
    question = question.strip()
    return question if question.endswith("?") else question + "?"


def build_instruction(question: str, template: str = SEARCH_R1_TEMPLATE) -> str:
    """The user message: `template` with `{question}` replaced by the cleaned-up question."""
    if "{question}" not in template:
        raise ValueError(f"template must contain the placeholder '{{question}}', got {template[:80]!r}...")
    return template.replace("{question}", format_question(question))


def has_chat_template(tokenizer: Any) -> bool:
    """True when the tokenizer carries a chat template (instruct models)."""
    return bool(getattr(tokenizer, "chat_template", None))


def render_messages(messages: list[dict[str, str]], tokenizer: Any, use_chat_template: bool = True) -> str:
    """Text of the first prompt for `messages` ([{"role", "content"}], as in Search-R1 parquet files).

    With a chat template (and `use_chat_template`): the template applied with add_generation_prompt=True,
    so the text ends where the assistant starts writing. Without one: the first message's content, as
    verl's RLHFDataset does (a base model reads the instruction directly).
    """
    if not messages or not all(isinstance(m, dict) and "content" in m for m in messages):
        raise ValueError(f"messages must be a non-empty list of {{'role', 'content'}} dicts, got {messages!r}")
    if use_chat_template and has_chat_template(tokenizer):
        return tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    return messages[0]["content"]


def encode_prompt(
    question: str | None = None,
    tokenizer: Any = None,
    *,
    messages: list[dict[str, str]] | None = None,
    template: str = SEARCH_R1_TEMPLATE,
    use_chat_template: bool = True,
) -> list[int]:
    """Token ids [P] of the first prompt: from `messages` if given, else from `question` and `template`.

    Encoded with add_special_tokens=False, as verl's tokenize_and_postprocess_data does: the chat text
    already holds the model's special tokens, and the reference adds none to a bare instruction either.
    """
    if tokenizer is None:
        raise ValueError("encode_prompt needs a tokenizer")
    if messages is None:
        if question is None:
            raise ValueError("encode_prompt needs either question= or messages=")
        messages = [{"role": "user", "content": build_instruction(question, template)}]
    text = render_messages(messages, tokenizer, use_chat_template)
    return list(tokenizer.encode(text, add_special_tokens=False))
