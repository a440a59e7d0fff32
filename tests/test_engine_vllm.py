"""The optional vLLM backend: a clear ImportError without vllm; same interface and greedy tokens with it."""

from __future__ import annotations

import copy
import importlib.util

import pytest

from rexrag_fast.engine import Request, SamplingParams

HAVE_VLLM = importlib.util.find_spec("vllm") is not None


@pytest.mark.skipif(HAVE_VLLM, reason="vllm is installed")
def test_missing_vllm_says_what_to_install():
    from rexrag_fast.engine.vllm_backend import VLLMEngine

    with pytest.raises(ImportError, match="pip install"):
        VLLMEngine("any-model")


@pytest.mark.gpu
@pytest.mark.slow
@pytest.mark.skipif(not HAVE_VLLM, reason="vllm is not installed")
def test_vllm_backend_matches_engine_greedy(tmp_path):
    from rexrag_fast.engine import EngineConfig, LLMEngine
    from rexrag_fast.engine.loaders import load_smollm2
    from rexrag_fast.engine.vllm_backend import VLLMEngine

    model, tokenizer = load_smollm2()
    model.save_pretrained(tmp_path)
    tokenizer.save_pretrained(tmp_path)
    prompts = [tokenizer.encode("The three primary colours are"), tokenizer.encode("Paris is the capital of")]
    sp = SamplingParams(temperature=0.0, max_tokens=8, stop=(), ignore_eos=True)
    gpu_model = copy.deepcopy(model).cuda()  # load_smollm2's model is shared within the process
    ours = LLMEngine(gpu_model, tokenizer=tokenizer, config=EngineConfig(num_blocks=64, dtype=model.dtype))
    theirs = VLLMEngine(str(tmp_path), dtype="float32")
    a = ours.generate([Request(p, sp) for p in prompts])
    b = theirs.generate([Request(p, sp) for p in prompts])
    assert [x.output_token_ids for x in a] == [x.output_token_ids for x in b]
    fork = theirs.generate([theirs.fork(b[0], len(b[0].token_ids) - 2, prompts[1], sp)])[0]
    assert len(fork.output_token_ids) == 8
