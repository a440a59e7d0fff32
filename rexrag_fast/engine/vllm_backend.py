"""Optional vLLM backend behind the LLMEngine interface (generate / extend / fork / update_weights).

For users on GPUs who prefer vLLM's kernels; automatic prefix caching is on, so extend / fork reuse the
shared prefix's KV as in LLMEngine. vLLM is imported lazily; without it construction raises ImportError with
the install command. Differences: vLLM reports log-probs after its own processing (`logprobs_mode`
"processed_logprobs" is requested where the installed vLLM supports it: temperature-scaled, equal to
LLMEngine's when top-k / top-p are off); the counters hold only request, prompt and generated token counts.
"""

from __future__ import annotations

import inspect
from typing import Any

from rexrag_fast.engine.config import SamplingParams
from rexrag_fast.engine.counters import EngineCounters
from rexrag_fast.engine.sequence import Completion, Request, extend_request, fork_request


def _import_vllm() -> Any:
    try:
        import vllm
    except ImportError as e:
        raise ImportError(
            "the vLLM backend needs vllm: pip install 'rexrag-fast[gpu]' (or pip install vllm with the torch "
            "version it pins); LLMEngine is the built-in alternative"
        ) from e
    return vllm


class VLLMEngine:
    """LLMEngine's interface on top of `vllm.LLM` (model: a checkpoint directory or hub name)."""

    def __init__(self, model: str, tokenizer: Any = None, *, gpu_memory_utilization: float = 0.5,
                 dtype: str = "auto", seed: int = 0, **llm_kwargs: Any) -> None:
        vllm = _import_vllm()
        self._vllm = vllm
        kwargs: dict[str, Any] = dict(model=model, enable_prefix_caching=True, dtype=dtype, seed=seed,
                                      gpu_memory_utilization=gpu_memory_utilization)
        if "logprobs_mode" in inspect.signature(vllm.EngineArgs.__init__).parameters:
            kwargs["logprobs_mode"] = "processed_logprobs"
        kwargs.update(llm_kwargs)
        self.llm = vllm.LLM(**kwargs)
        self.tokenizer = tokenizer if tokenizer is not None else self.llm.get_tokenizer()
        self.counters = EngineCounters()
        self.weights_version = 0

    def _params(self, sp: SamplingParams) -> Any:
        return self._vllm.SamplingParams(
            temperature=sp.temperature, top_p=sp.top_p, top_k=sp.top_k, max_tokens=sp.max_tokens,
            stop_token_ids=list(sp.stop_token_ids), stop=list(sp.stop), seed=sp.seed, ignore_eos=sp.ignore_eos,
            include_stop_str_in_output=True, logprobs=0,
        )

    def generate(self, requests: list[Request], progress: bool = False) -> list[Completion]:
        """Same contract as LLMEngine.generate."""
        for r in requests:
            if not r.prompt_token_ids:
                raise ValueError("generate: empty prompt (a request needs at least one token)")
        prompts = [{"prompt_token_ids": list(r.prompt_token_ids)} for r in requests]
        outs = self.llm.generate(prompts, [self._params(r.sampling) for r in requests], use_tqdm=progress)
        completions = []
        for r, out in zip(requests, outs):
            o = out.outputs[0]
            ids = list(o.token_ids)
            logprobs = [float(step[t].logprob) for step, t in zip(o.logprobs or [], ids)]
            reason, stop_str = o.finish_reason, None
            if reason == "stop":
                if isinstance(o.stop_reason, str):
                    stop_str = o.stop_reason
                elif o.stop_reason is None:
                    reason = "eos"
            prompt = list(r.prompt_token_ids)
            completions.append(Completion(prompt + ids, len(prompt), ids, logprobs, reason, stop_str, o.text))
            self.counters.requests += 1
            self.counters.prompt_tokens += len(prompt)
            self.counters.generated_tokens += len(ids)
        return completions

    def extend(self, completion: Completion, new_token_ids: list[int],
               sampling: SamplingParams | None = None) -> Request:
        return extend_request(completion, new_token_ids, sampling)

    def fork(self, completion: Completion, keep_tokens: int, append_token_ids: list[int],
             sampling: SamplingParams | None = None) -> Request:
        return fork_request(completion, keep_tokens, append_token_ids, sampling)

    def update_weights(self, model_or_state_dict: Any) -> None:
        """Load new weights into the vLLM worker's model and drop the prefix cache (stale KV)."""
        items = (model_or_state_dict.state_dict() if hasattr(model_or_state_dict, "state_dict")
                 else model_or_state_dict)
        items = list(items.items()) if hasattr(items, "items") else list(items)
        self.llm.collective_rpc(_load_weights_on_worker, args=(items,))
        self.llm.reset_prefix_cache()
        self.weights_version += 1

    load_weights = update_weights

    def reset_counters(self) -> None:
        self.counters = EngineCounters()


def _load_weights_on_worker(worker: Any, items: list) -> None:
    worker.model_runner.model.load_weights(items)
