"""LLMEngine: generate completions for a list of requests with continuous batching over a paged KV pool.

One step = schedule -> build the flat batch (token ids, positions, KV slots, block tables) -> forward ->
sample -> append tokens and check stops -> release finished sequences into the prefix cache.
"""

from __future__ import annotations

import logging
import time
from typing import Any

import torch

from rexrag_fast.engine.attention import AttentionMetadata
from rexrag_fast.engine.block_manager import BlockManager, blocks_for
from rexrag_fast.engine.config import EngineConfig, SamplingParams, resolve_dtype
from rexrag_fast.engine.counters import EngineCounters
from rexrag_fast.engine.cuda_graphs import DecodeGraphRunner
from rexrag_fast.engine.host_memory import keep_freed_heap_memory
from rexrag_fast.engine.model_runner import ModelRunner
from rexrag_fast.engine.sampling import sample
from rexrag_fast.engine.scheduler import Scheduler
from rexrag_fast.engine.sequence import Completion, Request, Sequence, extend_request, fork_request
from rexrag_fast.engine.stop import StopChecker

logger = logging.getLogger(__name__)


def _eos_ids(model_config: Any, tokenizer: Any) -> frozenset[int]:
    ids: set[int] = set()
    eos = getattr(model_config, "eos_token_id", None)
    if isinstance(eos, int):
        ids.add(eos)
    elif eos:
        ids.update(int(e) for e in eos)
    if tokenizer is not None and getattr(tokenizer, "eos_token_id", None) is not None:
        ids.add(int(tokenizer.eos_token_id))
    return frozenset(ids)


class LLMEngine:
    """Rollout engine for a Qwen2 / Llama causal LM (transformers model or state dict + config).

    model: a transformers *ForCausalLM (its config and weights are copied; the engine keeps its own
    weights) or a state dict, with `model_config` given. tokenizer: needed for stop strings and `text`.
    """

    def __init__(self, model: Any, tokenizer: Any = None, config: EngineConfig | None = None, *,
                 model_config: Any = None) -> None:
        self.config = config = config or EngineConfig()
        model_config = model_config if model_config is not None else getattr(model, "config", None)
        if model_config is None:
            raise ValueError("LLMEngine: pass a transformers model, or a state dict together with model_config=")
        device = torch.device(config.device) if config.device is not None else _model_device(model)
        dtype = resolve_dtype(config.dtype, device, _model_dtype(model))
        self.model_config = model_config
        self.tokenizer = tokenizer
        if device.type == "cpu" and config.cpu_keep_freed_memory:
            keep_freed_heap_memory()
        self.runner = ModelRunner(model, model_config, num_blocks=config.num_blocks,
                                  block_size=config.block_size, device=device, dtype=dtype,
                                  attention_backend=config.attention_backend)
        self.shape = self.runner.shape
        self.device = device
        graphs = config.cuda_graphs if config.cuda_graphs is not None else device.type == "cuda"
        if graphs and self.runner.backend == "cpp":
            raise ValueError("EngineConfig.cuda_graphs: the 'cpp' backend cannot run the padded decode path "
                             "(pick attention_backend 'torch' on a CPU, or leave cuda_graphs None)")
        # with graphs the last block is the padding rows' scratch: the allocator never hands it out
        self.usable_blocks = config.num_blocks - 1 if graphs else config.num_blocks
        self.block_manager = BlockManager(self.usable_blocks, config.block_size, config.enable_prefix_caching)
        self.decode_graphs: DecodeGraphRunner | None = None
        if graphs:
            self.decode_graphs = DecodeGraphRunner(
                self.runner.decode_forward, max_batch=min(config.max_num_seqs, config.max_num_batched_tokens),
                max_blocks=min(self.usable_blocks, blocks_for(self.shape.max_position_embeddings, config.block_size)),
                pad_slot=self.usable_blocks * config.block_size, device=device)
            if device.type == "cuda":
                self.decode_graphs.capture()
        self.scheduler = Scheduler(self.block_manager, config.max_num_batched_tokens, config.max_num_seqs)
        self.eos_token_ids = _eos_ids(model_config, tokenizer)
        self.counters = EngineCounters()
        self.weights_version = 0
        self._next_id = 0

    # ------------------------------------------------------------------ public API
    def generate(self, requests: list[Request], progress: bool = False) -> list[Completion]:
        """Run every request to completion; completions come back in the order of `requests`.

        All requests are validated before any runs, so a bad one raises without side effects.
        """
        seqs = [self._make_sequence(r) for r in requests]
        for seq in seqs:
            self.scheduler.add(seq)
            self.counters.prompt_tokens += seq.prompt_len
            self.counters.requests += 1
        bar = None
        if progress:
            from tqdm import tqdm

            bar = tqdm(total=len(seqs), desc="generate", unit="seq")
        stoppers = {seq.seq_id: StopChecker(seq.sampling, self.tokenizer, seq.prompt_len) for seq in seqs}
        done: dict[int, Completion] = {}
        try:
            while self.scheduler.has_work():
                for seq in self._step(stoppers):
                    done[seq.seq_id] = seq.to_completion(self._decode(seq.token_ids[seq.prompt_len:]))
                    if bar is not None:
                        bar.update(1)
        except BaseException:
            # an error or an interrupt mid-run: hand every block back so the engine stays usable
            self.scheduler.abort_all()
            raise
        finally:
            if bar is not None:
                bar.close()
        return [done[seq.seq_id] for seq in seqs]

    def extend(self, completion: Completion, new_token_ids: list[int],
               sampling: SamplingParams | None = None) -> Request:
        """A request continuing `completion` after `new_token_ids` (e.g. retrieved documents).

        Its prompt is completion.token_ids + new_token_ids; the finished completion's full blocks are in the
        prefix cache, so only the last partial block and the new tokens are computed.
        """
        return extend_request(completion, new_token_ids, sampling)

    def fork(self, completion: Completion, keep_tokens: int, append_token_ids: list[int],
             sampling: SamplingParams | None = None) -> Request:
        """A new branch: the first `keep_tokens` tokens of `completion`, then `append_token_ids`, then generation.

        Full blocks of the kept prefix are shared through the prefix cache (no KV recomputed for them); the
        tokens of a partial last block are recomputed.
        """
        return fork_request(completion, keep_tokens, append_token_ids, sampling)

    def update_weights(self, model_or_state_dict: Any) -> None:
        """Copy new weights in place (no KV pool re-allocation) and bump the cache namespace.

        Accepts a transformers model, a state dict, or an iterable of (name, tensor) pairs such as
        ZeroActor.iter_gathered_parameters() (consumed one tensor at a time).
        """
        if self.scheduler.has_work():
            raise RuntimeError("update_weights: sequences are still running; call it between generate() calls")
        # the namespace moves first: even a failed, partial copy must never let old KV be reused
        self.weights_version += 1
        self.block_manager.new_namespace()
        self.runner.update_weights(model_or_state_dict)

    def load_weights(self, named_tensors: Any) -> None:
        """update_weights under vLLM's name (VLLMEngine has the same pair): code written for either runs on both."""
        self.update_weights(named_tensors)

    def reset_counters(self) -> None:
        self.counters = EngineCounters()

    def reset_prefix_cache(self) -> None:
        """Drop every cached prefix (nothing may be running)."""
        if self.scheduler.has_work():
            raise RuntimeError("reset_prefix_cache: sequences are still running")
        self.block_manager.cache.evict(self.block_manager.cache.evictable_blocks)

    # ------------------------------------------------------------------ internals
    def _make_sequence(self, request: Request) -> Sequence:
        if not isinstance(request, Request):
            raise TypeError(f"generate: expected Request objects, got {type(request).__name__}")
        sp = request.sampling
        tokens = request.prompt_token_ids
        if isinstance(tokens, torch.Tensor):
            tokens = tokens.tolist()
        tokens = [int(t) for t in tokens]
        vocab, max_pos = self.shape.vocab_size, self.shape.max_position_embeddings
        if not tokens:
            raise ValueError("generate: empty prompt (a request needs at least one token)")
        if len(tokens) >= max_pos:
            raise ValueError(
                f"generate: prompt of {len(tokens)} tokens does not fit the model's context "
                f"(max_position_embeddings={max_pos}; at least one token must be left to generate)"
            )
        bad = [t for t in tokens if not 0 <= t < vocab]
        if bad:
            raise ValueError(f"generate: prompt token ids must be in [0, {vocab}), got {bad[:5]}")
        bad = [t for t in sp.stop_token_ids if t >= vocab]
        if bad:
            raise ValueError(f"generate: stop_token_ids {bad} are not in the vocabulary [0, {vocab})")
        if sp.stop and self.tokenizer is None:
            raise ValueError(f"generate: stop strings {sp.stop} need a tokenizer (LLMEngine(tokenizer=...)) "
                             "or pass SamplingParams(stop=())")
        seq = Sequence(self._next_id, Request(tokens, sp), max_pos, self._generator(sp))
        need = blocks_for(seq.max_len, self.config.block_size)
        if need > self.usable_blocks:
            raise ValueError(
                f"generate: a request of {len(tokens)} prompt + up to {seq.max_len - len(tokens)} new tokens "
                f"needs {need} KV blocks of {self.config.block_size} tokens, but the pool has only "
                f"{self.usable_blocks} (raise EngineConfig.num_blocks or lower max_tokens)"
            )
        self._next_id += 1
        return seq

    def _generator(self, sp: SamplingParams) -> torch.Generator | None:
        if sp.greedy:
            return None
        # unseeded requests draw their seed from torch's global RNG, so torch.manual_seed reproduces them
        seed = sp.seed if sp.seed is not None else int(torch.randint(0, 2**62, (1,)).item())
        return torch.Generator().manual_seed(seed)  # on the host: the sampler draws one uniform per row there

    def _decode(self, token_ids: list[int]) -> str | None:
        if self.tokenizer is None:
            return None
        return self.tokenizer.decode(token_ids, skip_special_tokens=False)

    def _step(self, stoppers: dict[int, Any]) -> list[Sequence]:
        c = self.counters
        t0 = time.perf_counter()
        n_cached_before = self.scheduler.num_cached_tokens
        n_preempt_before = self.scheduler.num_preemptions
        seqs, is_prefill = self.scheduler.schedule()
        c.cached_tokens += self.scheduler.num_cached_tokens - n_cached_before
        c.preemptions += self.scheduler.num_preemptions - n_preempt_before
        if not seqs:
            c.schedule_seconds += time.perf_counter() - t0
            return []
        input_ids, positions, meta, sampling_rows, sampling_seqs = self._prepare(seqs, is_prefill)
        t1 = time.perf_counter()
        c.schedule_seconds += t1 - t0
        if self.decode_graphs is not None and not is_prefill:  # every row of a decode step samples
            logits = self.decode_graphs.run(input_ids, positions, meta.slot_mapping, meta.block_tables,
                                            meta.context_lens)
        else:
            logits = self.runner.forward(input_ids, positions, meta, sampling_rows)
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        t2 = time.perf_counter()
        n = int(input_ids.numel())
        if is_prefill:
            c.prefill_seconds += t2 - t1
            c.prefill_tokens += n
        else:
            c.decode_seconds += t2 - t1
            c.decode_tokens += n
        for seq in seqs:
            seq.num_computed += seq.num_scheduled
            seq.num_scheduled = 0
            if is_prefill:
                self.block_manager.publish(seq)
        finished: list[Sequence] = []
        if sampling_seqs:
            tokens, logprobs = sample(logits, [s.sampling for s in sampling_seqs],
                                      [s.generator for s in sampling_seqs])
            for seq, tok, lp in zip(sampling_seqs, tokens, logprobs):
                seq.token_ids.append(tok)
                seq.logprobs.append(lp)
                c.generated_tokens += 1
                reason, stop_str = stoppers[seq.seq_id].check(seq.token_ids, tok, self.eos_token_ids)
                if reason is None and len(seq) >= seq.max_len:
                    reason = "length"
                if reason is not None:
                    seq.finish_reason, seq.stop_str = reason, stop_str
                    self.scheduler.finish(seq)
                    finished.append(seq)
        c.sample_seconds += time.perf_counter() - t2
        return finished

    def _prepare(self, seqs: list[Sequence], is_prefill: bool
                 ) -> tuple[torch.Tensor, torch.Tensor, AttentionMetadata, torch.Tensor, list[Sequence]]:
        """Flat inputs of one forward: input_ids [T], positions [T], attention metadata, the rows of the batch
        that sample [S] (each sequence's last token once its prompt is fully computed), those S sequences."""
        kv = self.runner.kv
        ids: list[int] = []
        pos: list[int] = []
        slots: list[int] = []
        q_lens: list[int] = []
        ctx_lens: list[int] = []
        rows: list[int] = []
        sampling_seqs: list[Sequence] = []
        for seq in seqs:
            start, end = seq.num_computed, seq.num_computed + seq.num_scheduled
            ids += seq.token_ids[start:end]
            pos += range(start, end)
            slots += kv.slots(seq.block_table, start, end)
            q_lens.append(end - start)
            ctx_lens.append(end)
            if end == len(seq):
                rows.append(len(ids) - 1)
                sampling_seqs.append(seq)
        max_blocks = max(blocks_for(c, kv.block_size) for c in ctx_lens)
        tables = [s.block_table[:max_blocks] + [0] * (max_blocks - min(len(s.block_table), max_blocks))
                  for s in seqs]
        dev = self.device
        as_i32 = lambda x: torch.tensor(x, dtype=torch.int32, device=dev)
        meta = AttentionMetadata(
            is_prefill=is_prefill,
            slot_mapping=torch.tensor(slots, dtype=torch.int64, device=dev),
            block_tables=as_i32(tables),
            context_lens=as_i32(ctx_lens),
            max_seqlen_q=max(q_lens),
            max_seqlen_k=max(ctx_lens),
            query_lens_list=q_lens,
            context_lens_list=ctx_lens,
            no_cached_prefix=q_lens == ctx_lens,
        )
        if is_prefill:
            cu_q = [0]
            cu_k = [0]
            for q, k in zip(q_lens, ctx_lens):
                cu_q.append(cu_q[-1] + q)
                cu_k.append(cu_k[-1] + k)
            meta.cu_seqlens_q, meta.cu_seqlens_k = as_i32(cu_q), as_i32(cu_k)
        input_ids = torch.tensor(ids, dtype=torch.int64, device=dev)
        positions = torch.tensor(pos, dtype=torch.int64, device=dev)
        return input_ids, positions, meta, torch.tensor(rows, dtype=torch.int64, device=dev), sampling_seqs


def _model_device(model: Any) -> torch.device:
    if isinstance(model, torch.nn.Module):
        p = next(model.parameters(), None)
        if p is not None:
            return p.device
    else:
        for t in model.values():
            return t.device
    return torch.device("cpu")


def _model_dtype(model: Any) -> torch.dtype:
    if isinstance(model, torch.nn.Module):
        p = next(model.parameters(), None)
        if p is not None and p.dtype.is_floating_point:
            return p.dtype
    else:
        for t in model.values():
            if t.dtype.is_floating_point:
                return t.dtype
    return torch.float32
