"""The instruction template of the search protocol and the chat wrapping of the first prompt.

As in Search-R1, the whole protocol is one user message: reason in <think>, search with
<search> query </search>, read <information>, answer with <answer> ... </answer>. The question is stripped
and gets a trailing "?" when it has none. verl's dataset then renders that message with the tokenizer's
chat template (add_generation_prompt=True) when the tokenizer has one, and uses the bare text otherwise;
`encode_prompt` does the same.

DEFAULT_TEMPLATE is the project's own wording of that protocol. To reproduce a reference run token for
token, use the reference's prompts: Search-R1 parquet files carry the rendered instruction in `prompt`
(used as is), and `data.prompt_template: FILE` replaces this text for questions without one.
"""

from __future__ import annotations

from typing import Any

DEFAULT_TEMPLATE = (
    "Answer the question below. Each time new information arrives, think it through inside <think> and "
    "</think> first. When you are missing a fact, write a query as <search> query </search>; the results "
    "come back between <information> and </information>. Search as often as you need. When you know the "
    "answer, give only the answer inside <answer> and </answer>, for example <answer> Paris </answer>. "
    "Question: {question}\n"
)
"""The project's instruction text for the tag protocol; `{question}` is replaced by the question."""


def read_user_text(path: str, what: str) -> str:
    """The text of a user's file `path` (UTF-8, verbatim, not empty); `what` names it in errors."""
    from pathlib import Path

    try:
        text = Path(path).read_text(encoding="utf-8")
    except OSError as e:
        raise ValueError(f"{what} file {path!r} cannot be read: {e.strerror or e}") from None
    if not text:
        raise ValueError(f"{what} file {path!r} is empty")
    return text


def load_template(path: str) -> str:
    """An instruction template read from the text file `path` (UTF-8); it must contain `{question}`."""
    text = read_user_text(path, "prompt template")
    if "{question}" not in text:
        raise ValueError(f"prompt template file {path!r} must contain the placeholder '{{question}}'")
    return text


def format_question(question: str) -> str:
    """Search-R1's question clean-up: strip, then end with "?" if it does not already."""
    if not isinstance(question, str) or not question.strip():
        raise ValueError(f"question must be a non-empty string, got {question!r}")
    question = question.strip()
    return question if question.endswith("?") else question + "?"


def build_instruction(question: str, template: str = DEFAULT_TEMPLATE) -> str:
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
    template: str = DEFAULT_TEMPLATE,
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
