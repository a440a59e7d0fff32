"""The instruction template and chat rendering with the real SmolLM2 tokenizer."""

from __future__ import annotations

import pytest

from rexrag_fast.agent.template import (
    DEFAULT_TEMPLATE,
    build_instruction,
    encode_prompt,
    format_question,
    load_template,
    render_messages,
)


@pytest.fixture(scope="module")
def tokenizer():
    from rexrag_fast.engine.loaders import load_smollm2_tokenizer

    return load_smollm2_tokenizer()


class _PlainTokenizer:
    """A tokenizer without a chat template: wraps the real one but hides its template."""

    chat_template = None

    def __init__(self, inner) -> None:
        self.inner = inner

    def encode(self, text, add_special_tokens=True):
        return self.inner.encode(text, add_special_tokens=add_special_tokens)


def test_default_template_speaks_the_tag_protocol() -> None:
    text = build_instruction("  who founded Rome ")
    for tag in ("<think>", "</think>", "<search>", "</search>", "<information>", "</information>", "<answer>",
                "</answer>"):
        assert tag in text, tag
    assert text.endswith("Question: who founded Rome?\n")
    assert DEFAULT_TEMPLATE.count("{question}") == 1


def test_template_from_file(tmp_path) -> None:
    f = tmp_path / "t.txt"
    f.write_text("Use the tags. Q: {question}\n", encoding="utf-8")
    assert build_instruction("why", template=load_template(str(f))) == "Use the tags. Q: why?\n"
    f.write_text("no slot", encoding="utf-8")
    with pytest.raises(ValueError, match="placeholder"):
        load_template(str(f))
    with pytest.raises(ValueError, match="cannot be read"):
        load_template(str(tmp_path / "missing.txt"))


@pytest.mark.parametrize("q, out", [("x", "x?"), ("x?", "x?"), ("  is it? ", "is it?")])
def test_format_question(q: str, out: str) -> None:
    assert format_question(q) == out


def test_bad_inputs() -> None:
    with pytest.raises(ValueError, match="non-empty string"):
        format_question("   ")
    with pytest.raises(ValueError, match="placeholder"):
        build_instruction("q", template="no slot")
    with pytest.raises(ValueError, match="role"):
        render_messages([], None)
    with pytest.raises(ValueError, match="tokenizer"):
        encode_prompt("q")


def test_custom_template() -> None:
    assert build_instruction("why", template="Q: {question} A:") == "Q: why? A:"


def test_chat_template_applied(tokenizer) -> None:
    ids = encode_prompt("who founded Rome", tokenizer)
    text = tokenizer.decode(ids)
    assert text.startswith("<|im_start|>")
    assert "<|im_start|>user\n" + DEFAULT_TEMPLATE.split("{question}")[0] in text
    assert text.endswith("Question: who founded Rome?\n<|im_end|>\n<|im_start|>assistant\n")
    # rendering once: no doubled special tokens at the start
    assert ids.count(ids[0]) == text.count("<|im_start|>")
    # the same prompt given as ready messages encodes identically
    msgs = [{"role": "user", "content": build_instruction("who founded Rome")}]
    assert encode_prompt(messages=msgs, tokenizer=tokenizer) == ids


def test_no_chat_template_uses_bare_text(tokenizer) -> None:
    plain = _PlainTokenizer(tokenizer)
    ids = encode_prompt("who founded Rome", plain)
    assert tokenizer.decode(ids) == build_instruction("who founded Rome")
    # as verl's dataset: the first message's content, no special tokens added
    assert render_messages([{"role": "user", "content": "A"}, {"role": "user", "content": "B"}], plain) == "A"
    # use_chat_template=False forces the bare text even with a template
    assert encode_prompt("who founded Rome", tokenizer, use_chat_template=False) == ids
