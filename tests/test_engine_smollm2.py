"""The engine on the real SmolLM2-135M-Instruct (Llama, GQA 9/3 heads, tied embeddings, rope theta 1e5)."""

from __future__ import annotations

import pytest
import torch

from rexrag_fast.engine import EngineConfig, LLMEngine, Request, SamplingParams
from rexrag_fast.engine.hf_reference import hf_greedy, hf_logprobs
from rexrag_fast.engine.loaders import load_smollm2
from rexrag_fast.testing import assert_close

pytestmark = pytest.mark.slow


def test_smollm2_greedy_matches_transformers():
    model, tokenizer = load_smollm2()
    assert model.config.model_type == "llama" and model.config.num_key_value_heads == 3
    messages = [{"role": "user", "content": "What is the capital of France? Answer in one word."}]
    chat = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    prompts = [tokenizer.encode(chat), tokenizer.encode("The three primary colours are")]
    engine = LLMEngine(model, tokenizer=tokenizer, config=EngineConfig(num_blocks=32, block_size=16))
    sp = SamplingParams(temperature=0.0, max_tokens=12, stop=(), ignore_eos=True)
    outs = engine.generate([Request(p, sp) for p in prompts])
    for p, out in zip(prompts, outs):
        assert out.output_token_ids == hf_greedy(model, p, 12)
        assert_close(torch.tensor(out.output_logprobs), hf_logprobs(model, out.token_ids, len(p)),
                     torch.float32, atol=1e-4, name="SmolLM2 log-probs")
    assert "Paris" in outs[0].text
