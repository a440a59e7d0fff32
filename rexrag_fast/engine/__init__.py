"""rexrag_fast.engine: the rollout engine (paged KV, continuous batching, sampling, prefix reuse, fork).

    engine = LLMEngine(model, tokenizer=tokenizer, config=EngineConfig(num_blocks=..., block_size=16))
    outs = engine.generate([Request(prompt_token_ids, SamplingParams(temperature=0)), ...])
    req = engine.fork(outs[0], keep_tokens, append_token_ids, sp)   # shares the cached prefix's KV
"""

from rexrag_fast.engine.config import EngineConfig, SamplingParams
from rexrag_fast.engine.counters import EngineCounters
from rexrag_fast.engine.llm_engine import LLMEngine
from rexrag_fast.engine.sequence import Completion, Request

__all__ = ["Completion", "EngineConfig", "EngineCounters", "LLMEngine", "Request", "SamplingParams"]
