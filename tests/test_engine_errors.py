"""Bad input to the engine: a clear error at submission, nothing left half-run, and the engine still works."""

from __future__ import annotations

import pytest
import torch

from rexrag_fast.engine import EngineConfig, LLMEngine, Request, SamplingParams
from rexrag_fast.engine.loaders import tiny_model

VOCAB = 256
OK = SamplingParams(temperature=0.0, max_tokens=4, stop=())


@pytest.fixture(scope="module")
def model():
    return tiny_model("qwen2", vocab_size=VOCAB, seed=5, max_position_embeddings=64)


@pytest.fixture
def engine(model):
    return LLMEngine(model, config=EngineConfig(num_blocks=16, block_size=4))


def assert_still_works(engine):
    assert not engine.scheduler.has_work()
    assert engine.block_manager.allocator.num_free + engine.block_manager.cache.evictable_blocks == 16
    out = engine.generate([Request([1, 2, 3], OK)])[0]
    assert len(out.output_token_ids) == 4


@pytest.mark.parametrize("request_,match", [
    (Request([], OK), "empty prompt"),
    (Request(list(range(64)), OK), "max_position_embeddings=64"),
    (Request([1, 2, VOCAB], OK), r"token ids must be in \[0, 256\)"),
    (Request([1, -1], OK), r"token ids must be in \[0, 256\)"),
    (Request([1, 2], SamplingParams(temperature=0.0, stop=(), stop_token_ids=(VOCAB + 7,))), r"stop_token_ids \[263\]"),
    (Request([1, 2], SamplingParams(temperature=0.0, stop=("</search>",))), "need a tokenizer"),
])
def test_bad_request_raises_before_running(engine, request_, match):
    good = Request([4, 5, 6], OK)
    with pytest.raises(ValueError, match=match):
        engine.generate([good, request_])  # validated as a whole: the good one does not run either
    assert engine.counters.requests == 0
    assert_still_works(engine)


def test_pool_too_small_for_one_sequence(model):
    engine = LLMEngine(model, config=EngineConfig(num_blocks=3, block_size=4))
    with pytest.raises(ValueError, match="needs 4 KV blocks of 4 tokens, but the pool has only 3"):
        engine.generate([Request([1, 2, 3, 4, 5, 6], SamplingParams(temperature=0, max_tokens=8, stop=()))])
    # fits when generation is short enough: 6 + 6 tokens = 3 blocks
    out = engine.generate([Request([1, 2, 3, 4, 5, 6], SamplingParams(temperature=0, max_tokens=6, stop=()))])[0]
    assert len(out.token_ids) == 12


def test_not_a_request(engine):
    with pytest.raises(TypeError, match="expected Request objects"):
        engine.generate([[1, 2, 3]])


@pytest.mark.parametrize("kwargs,match", [
    (dict(temperature=-0.1), "temperature"),
    (dict(top_p=0.0), "top_p"),
    (dict(top_p=1.5), "top_p"),
    (dict(top_k=0), "top_k"),
    (dict(max_tokens=0), "max_tokens"),
    (dict(stop=("",)), "stop"),
    (dict(stop_token_ids=(-3,)), "stop_token_ids"),
])
def test_bad_sampling_params(kwargs, match):
    with pytest.raises(ValueError, match=match):
        SamplingParams(**kwargs)


@pytest.mark.parametrize("kwargs,match", [
    (dict(num_blocks=0), "num_blocks"),
    (dict(block_size=-4), "block_size"),
    (dict(attention_backend="xformers"), "attention_backend"),
    (dict(dtype="bf16"), "dtype"),
    (dict(cpu_keep_freed_memory="yes"), "cpu_keep_freed_memory"),
])
def test_bad_engine_config(kwargs, match):
    with pytest.raises(ValueError, match=match):
        EngineConfig(**kwargs)


def test_flash_attn_refused_where_it_cannot_run(model):
    with pytest.raises(RuntimeError, match="flash_attn"):
        LLMEngine(model, config=EngineConfig(num_blocks=4, attention_backend="flash_attn", device="cpu"))


def test_unsupported_models_and_weights(model):
    with pytest.raises(ValueError, match="model_config"):
        LLMEngine(model.state_dict())
    bad = model.state_dict()
    bad = {k: v for k, v in bad.items() if "layers.1.mlp.up_proj" not in k}
    engine = LLMEngine(model, config=EngineConfig(num_blocks=4))
    with pytest.raises(KeyError, match="up_proj"):
        engine.update_weights(bad)
    wrong = dict(model.state_dict())
    wrong["model.norm.weight"] = torch.ones(3)
    with pytest.raises(ValueError, match="model.norm.weight has shape"):
        engine.update_weights(wrong)
    from transformers import GPT2Config

    with pytest.raises(ValueError, match="model_type must be one of"):
        LLMEngine({}, model_config=GPT2Config(), config=EngineConfig(num_blocks=4))


def test_dynamic_rope_refused():
    m = tiny_model("llama", vocab_size=VOCAB, seed=0,
                   rope_parameters={"rope_type": "dynamic", "factor": 2.0, "rope_theta": 10000.0})
    with pytest.raises(ValueError, match="rope_type 'dynamic'"):
        LLMEngine(m, config=EngineConfig(num_blocks=4))


def test_linear_rope_scaling_matches_transformers():
    from rexrag_fast.engine.hf_reference import hf_greedy

    m = tiny_model("llama", vocab_size=VOCAB, seed=0,
                   rope_parameters={"rope_type": "linear", "factor": 4.0, "rope_theta": 500.0})
    engine = LLMEngine(m, config=EngineConfig(num_blocks=16, block_size=4))
    p = list(range(3, 40))
    assert engine.generate([Request(p, OK)])[0].output_token_ids == hf_greedy(m, p, 4)


def test_error_mid_run_leaves_the_engine_usable(model):
    """A tokenizer that fails while stop strings are checked: the error propagates, no block stays taken."""

    class FailingTokenizer:
        eos_token_id = None
        calls = 0

        def decode(self, ids, skip_special_tokens=False):
            FailingTokenizer.calls += 1
            if FailingTokenizer.calls > 5:
                raise RuntimeError("tokenizer broke")
            return " ".join(map(str, ids))

    engine = LLMEngine(model, tokenizer=FailingTokenizer(), config=EngineConfig(num_blocks=16, block_size=4))
    sp = SamplingParams(temperature=0.0, max_tokens=20, stop=("never",))
    with pytest.raises(RuntimeError, match="tokenizer broke"):
        engine.generate([Request([1, 2, 3], sp), Request([4, 5, 6, 7, 8], sp)])
    engine.tokenizer = None
    assert_still_works(engine)
