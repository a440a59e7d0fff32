"""The demo policy: the world tokenizer (trained on the embedded world, ChatML, cached, deterministic) and
the small model."""

from __future__ import annotations

import pytest

from rexrag_fast.agent.template import DEFAULT_TEMPLATE, encode_prompt
from rexrag_fast.data.world import World, default_world_dir
from rexrag_fast.train.world_model import (
    SPECIAL_TOKENS,
    load_world_small,
    load_world_tokenizer,
    small_model,
    train_world_tokenizer,
)


@pytest.fixture(scope="module")
def world() -> World:
    return World.load(default_world_dir())


@pytest.fixture(scope="module")
def tokenizer(world):
    return train_world_tokenizer(world, vocab_size=4096)


def test_vocabulary_and_special_tokens(tokenizer):
    assert len(tokenizer) == 4096
    for tok in SPECIAL_TOKENS:
        assert len(tokenizer.encode(tok, add_special_tokens=False)) == 1, tok
    assert tokenizer.eos_token == "<|im_end|>" and tokenizer.pad_token == "<|endoftext|>"
    assert tokenizer.eos_token_id != tokenizer.pad_token_id


def test_round_trip_and_names_are_short(world, tokenizer):
    for doc in world.documents[::97]:
        ids = tokenizer.encode(doc["contents"], add_special_tokens=False)
        assert tokenizer.decode(ids) == doc["contents"]
    names = [e["name"] for es in world.entities.values() for e in es]
    mean_tokens = sum(len(tokenizer.encode(" " + n, add_special_tokens=False)) for n in names) / len(names)
    # SmolLM2's 49k vocabulary needs ~5.4 tokens per invented name; the world's own 4k BPE far fewer.
    assert mean_tokens < 4.0, mean_tokens
    for tag in ("<search>", "</search>", "<answer>", "</answer>", "<think>", "</think>"):
        assert tokenizer.decode(tokenizer.encode(tag, add_special_tokens=False)) == tag


def test_chatml_prompt(tokenizer):
    ids = encode_prompt("Where was Gamir Trinucynd born?", tokenizer)
    text = tokenizer.decode(ids)
    assert text.startswith("<|im_start|>user\n" + DEFAULT_TEMPLATE.split("{question}")[0])
    assert text.endswith("Question: Where was Gamir Trinucynd born?\n<|im_end|>\n<|im_start|>assistant\n")


def test_training_is_deterministic_and_cached(world, tokenizer, tmp_path, monkeypatch):
    assert train_world_tokenizer(world, vocab_size=4096).get_vocab() == tokenizer.get_vocab()
    monkeypatch.setenv("REXRAG_CACHE", str(tmp_path))
    first = load_world_tokenizer(world, vocab_size=4096)
    cached = list(tmp_path.glob("world-tokenizer-*"))
    assert len(cached) == 1 and (cached[0] / "tokenizer.json").is_file()
    again = load_world_tokenizer(world, vocab_size=4096)
    assert again.get_vocab() == first.get_vocab() == tokenizer.get_vocab()
    assert again.chat_template == tokenizer.chat_template and again.eos_token == "<|im_end|>"


def test_bad_vocab_size(world):
    with pytest.raises(ValueError, match="vocab_size must be >= 512"):
        train_world_tokenizer(world, vocab_size=100)


def test_small_model_and_world_small(tokenizer):
    import math

    import torch

    model, spec = small_model(tokenizer, seed=0)
    assert model.config.vocab_size == len(tokenizer) == spec["vocab_size"] and spec["hidden_size"] == 128
    again, _ = small_model(tokenizer, seed=0)
    assert all(torch.equal(a, b) for a, b in zip(model.parameters(), again.parameters()))
    ids = torch.tensor([tokenizer.encode("Who founded Defur Company?", add_special_tokens=False)])
    with torch.no_grad():
        loss = torch.nn.functional.cross_entropy(model(input_ids=ids).logits[0, :-1], ids[0, 1:])
    assert abs(float(loss) - math.log(len(tokenizer))) < 0.5
    policy, world_tok = load_world_small(seed=1)
    assert policy.config.vocab_size == len(world_tok) == 8192 and world_tok.eos_token == "<|im_end|>"
