"""The REX-RAG RL training loop: rollouts -> rewards -> probes -> log-probs -> ZeRO-3 update -> weight sync.

One RL step on every rank (`RLTrainer.step`), in the order of docs/DESIGN.md:

    questions   = the next data.train_batch_size prompts of the seeded data stream; this rank keeps its
                  contiguous shard (`distributed.shard_batch`), so whole GRPO groups live on one rank;
                  prompt tokens are cut to data.max_start_length (keeping the end, where the question is)
    rollouts    = run_agent_loop(engine, retriever, each prompt x rollout.n_agent)       current weights
    rewards     = exact match of each trajectory's <answer> against the golden answers
    REX-RAG     (algorithm.name = rexrag; plain GRPO skips this block)
                  make_probes: dead ends (answered, reward < 1, u < revision_prob) forked at their answer
                  with an exploratory prompt; run_probes continues them (prefix KV from the radix cache)
    old lp      = actor.compute_logprobs(packed trajectories)    recomputed by the actor, as verl does
                  REX-RAG: select_trajectories keeps every original and the best-ranked probes within
                  keep_probe_count(keep_ratio EMA); probe_logprobs (log mu) and alpha = kept probes /
                  kept batch, with err = 1 - accuracy of the originals, both over ALL ranks; then the
                  keep-ratio EMA folds in the accuracy of the kept probes
    ref lp      = reference.compute_logprobs(...)                 when algorithm.use_kl_loss
    advantages  = sequence_advantages(rewards, group ids)         per group (probes join their source's)
    update      = actor.update(mini-batches of whole groups, each packed into varlen micro-batches under
                  actor.max_tokens_per_micro_batch; loss = fused_policy_loss or the eager composition)
    weight sync = engine.update_weights(actor.iter_gathered_parameters())  ZeRO-3 shards gathered one
                  tensor at a time; the engine bumps its prefix-cache namespace, so no stale KV is reused
    metrics     = reward, EM, probe count / accuracy, alpha, clip fractions, KL, entropy, tokens/s of each
                  stage, peak memory -> <output_dir>/metrics.jsonl (+ TensorBoard, tqdm, curves.png)
    checkpoint  = every trainer.save_every steps, on SIGTERM/SIGINT and at the end (`checkpoint.py`)

Determinism and resume. Nothing in a step depends on RNG state carried between steps: the data order is a
function of (seed, epoch), and the rollout sampling seeds and the dead-end / prompt draws are derived from
(seed, step, rank, purpose). So a run resumed from the checkpoint of step k (weights, optimizer, data
position, keep-ratio average) repeats steps k+1.. of the uninterrupted run exactly on the CPU.

Output under trainer.output_dir: config.yaml (the resolved config), metrics.jsonl, tensorboard/, curves.png,
checkpoints/step_NNNNNN/ (the newest trainer.keep_last), and final/ (the trained weights as a Hugging Face
model directory with its tokenizer, for `rexrag-fast eval --model DIR`) when the run reaches max_steps.

Model names for model.path besides a Hugging Face directory: `smollm2-135m` (the embedded real model) and
`tiny-qwen2` (a random 2-layer Qwen2 with the SmolLM2 tokenizer, seeded by trainer.seed; for tests and
benchmarks of the machinery, it never answers correctly).
"""

from __future__ import annotations

import copy
import math
import os
import socket
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from rexrag_fast.agent.loop import AgentConfig, run_agent_loop
from rexrag_fast.agent.reward import exact_match
from rexrag_fast.agent.template import encode_prompt
from rexrag_fast.agent.trajectory import Component, Trajectory
from rexrag_fast.train import distributed as du
from rexrag_fast.train.checkpoint import TrainerState, list_checkpoints, load_checkpoint, save_checkpoint
from rexrag_fast.train.config import Config, config_to_dict, save_config
from rexrag_fast.train.metrics import MetricsLogger, peak_memory_bytes
from rexrag_fast.train.packing import (
    PackedBatch,
    first_fit_decreasing,
    pack_micro_batches,
    pack_sequences,
    scatter_back,
)
from rexrag_fast.train.signals import GracefulStop

TINY_MODEL = "tiny-qwen2"
SMOLLM2 = "smollm2-135m"
WORLD_SMALL = "world-small"
CHECKPOINT_SUBDIR = "checkpoints"
FINAL_MODEL_SUBDIR = "final"
KV_POOL_SHARE = 0.3  # of gpu_memory_utilization x card memory: the rollout KV pool (ZeRO-3 training needs the rest)
RESOLVED_CONFIG = "config.yaml"
# Purposes of derived seeds (one independent stream each).
_SEED_ROLLOUT, _SEED_PROBE_ROLLOUT, _SEED_PROBE_DRAWS = 1, 2, 3
# Every rank reports every key, probes or not (the reductions need the same keys everywhere).
_PROBE_KEYS = ("time/probe_s", "count/probes_made", "count/probe_generated_tokens", "count/probe_cached_tokens",
               "count/probe_tokens")


class RetrieverUnavailableError(RuntimeError):
    """The configured retrieval server did not answer a one-query probe."""


# ------------------------------------------------------------------------------------------ building


def derive_seed(*parts: int) -> int:
    """A 31-bit seed that is a fixed function of the integers `parts` (numpy SeedSequence mixing)."""
    return int(np.random.SeedSequence([int(p) for p in parts]).generate_state(1)[0] & 0x7FFFFFFF)


def load_policy(cfg: Config) -> tuple[torch.nn.Module, Any]:
    """(causal LM in fp32 train mode, tokenizer) for model.path: `smollm2-135m`, `tiny-qwen2`, `world-small` (the
    demo's small model and world tokenizer, untrained) or an HF dir.

    The returned model is the caller's own object (the shared SmolLM2 instance is copied)."""
    from rexrag_fast.engine.models import load_pretrained, load_smollm2, load_smollm2_tokenizer, tiny_model

    path = cfg.model.path
    if path == SMOLLM2:
        shared, tokenizer = load_smollm2()
        model = copy.deepcopy(shared)
    elif path == TINY_MODEL:
        tokenizer = load_smollm2_tokenizer()
        model = tiny_model("qwen2", vocab_size=len(tokenizer), seed=cfg.trainer.seed, tie_word_embeddings=False)
    elif path == WORLD_SMALL:
        from rexrag_fast.train.world_model import load_world_small

        model, tokenizer = load_world_small(seed=cfg.trainer.seed)
    elif Path(path).is_dir():
        model, tokenizer = load_pretrained(path, dtype=torch.float32)
        if cfg.model.tokenizer_path:
            from transformers import AutoTokenizer

            tokenizer = AutoTokenizer.from_pretrained(cfg.model.tokenizer_path,
                                                      trust_remote_code=cfg.model.trust_remote_code)
    else:
        raise ValueError(f"model.path: expected {SMOLLM2!r}, {TINY_MODEL!r}, {WORLD_SMALL!r} or a Hugging Face model "
                         f"directory, got {path!r} (not a directory)")
    if any(p.dtype != torch.float32 for p in model.parameters()):
        model = model.float()  # the GGUF SmolLM2 is de-quantised to fp32 already (and refuses .float())
    return model.train(), tokenizer


def check_retriever(url: str, timeout_s: float) -> None:
    """Send one query to the retrieval server at `url`; raise RetrieverUnavailableError at once if it fails.

    One retry at most and a timeout of min(timeout_s, 10) s: a training run must not start (and spend
    minutes loading a model) against a server that is not there."""
    from rexrag_fast.retrieval import RetrievalClient
    from rexrag_fast.retrieval.client import RetrievalError

    try:
        with RetrievalClient(url, timeout=min(timeout_s, 10.0), retries=1, backoff=0.2) as client:
            client.retrieve(["connectivity check"], topk=1)
    except (RetrievalError, ValueError) as e:
        raise RetrieverUnavailableError(
            f"retriever.url = {url} is unreachable: {e}\nStart a server (`rexrag-fast serve --index DIR`), "
            "fix retriever.url, or set retriever.embedded=true for the embedded world's in-process retriever."
        ) from None


def build_retriever(cfg: Config) -> Any:
    """The in-process retriever of the embedded world (retriever.embedded) or an HTTP client of retriever.url
    (checked with one query first). The world index is built by rank 0 before the others load it."""
    from rexrag_fast.retrieval import LocalRetriever, RetrievalClient

    if cfg.retriever.embedded:
        if du.is_main():
            retriever = LocalRetriever.for_world()
        du.barrier()
        if not du.is_main():
            retriever = LocalRetriever.for_world()
        return retriever
    check_retriever(cfg.retriever.url, cfg.retriever.timeout_s)
    return RetrievalClient(cfg.retriever.url, timeout=cfg.retriever.timeout_s)


def load_train_examples(cfg: Config) -> list[Any]:
    """QAExamples of data.train_files, or the embedded world's train split when the list is empty."""
    from rexrag_fast.data.datasets import load_many, load_world_split

    examples = load_many(cfg.data.train_files) if cfg.data.train_files else load_world_split("train")
    if not examples:
        raise ValueError(f"data.train_files: no examples in {cfg.data.train_files or 'the embedded world'}")
    return examples


def agent_config(cfg: Config, seed: int | None) -> AgentConfig:
    """The agent loop's limits from the config: a trajectory (prompt <= max_start_length) stays within
    data.max_prompt_length + data.max_response_length tokens, the longest the packer must hold."""
    d = cfg.data
    return AgentConfig(
        max_turns=cfg.rollout.max_turns, topk=cfg.retriever.topk, max_obs_tokens=d.max_obs_length,
        max_tokens_per_turn=d.max_response_length,
        max_response_tokens=d.max_prompt_length + d.max_response_length - d.max_start_length,
        temperature=cfg.rollout.temperature, top_p=cfg.rollout.top_p, top_k=cfg.rollout.top_k, seed=seed,
    )


def kv_pool_blocks(cfg: Config, model_config: Any, num_seqs: int, device: torch.device) -> int:
    """KV blocks of the rollout engine: enough for `num_seqs` trajectories of the longest length at once,
    capped on a GPU at KV_POOL_SHARE * rollout.gpu_memory_utilization of the card (the rest is the actor's;
    the engine preempts and recomputes when the pool runs out).

        block bytes = layers * 2 (K, V) * block_size * kv_heads * head_dim * 2 (bf16)
    """
    bs = cfg.rollout.kv_block_size
    longest = cfg.data.max_prompt_length + cfg.data.max_response_length
    worst = num_seqs * (-(-longest // bs) + 1)
    if device.type != "cuda":
        return worst
    heads = model_config.num_attention_heads
    kv_heads = getattr(model_config, "num_key_value_heads", None) or heads
    head_dim = getattr(model_config, "head_dim", None) or model_config.hidden_size // heads
    block_bytes = model_config.num_hidden_layers * 2 * bs * kv_heads * head_dim * 2
    budget = KV_POOL_SHARE * cfg.rollout.gpu_memory_utilization * torch.cuda.get_device_properties(device).total_memory
    return max(1, min(worst, int(budget // block_bytes)))


def ensure_process_group() -> None:
    """Initialise torch.distributed (gloo on CPU, nccl on GPU); a single process without a launcher gets a
    1-rank group on a free local port (DeepSpeed needs a group even then)."""
    if du.is_initialized():
        return
    if "RANK" not in os.environ:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        os.environ.update({"RANK": "0", "WORLD_SIZE": "1", "LOCAL_RANK": "0", "LOCAL_WORLD_SIZE": "1",
                           "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)})
    du.init_distributed()


# ------------------------------------------------------------------------------------------ data


class PromptStream:
    """An endless, reproducible order over N examples: epoch e is a permutation seeded by (seed, e)
    (identity when not shuffling). Position p (prompts consumed so far) fixes everything that follows."""

    def __init__(self, num_examples: int, seed: int, shuffle: bool = True) -> None:
        if num_examples < 1:
            raise ValueError(f"num_examples: expected >= 1, got {num_examples}")
        self.n = num_examples
        self.seed = seed
        self.shuffle = shuffle
        self._perm: dict[int, np.ndarray] = {}

    def _order(self, epoch: int) -> np.ndarray:
        if epoch not in self._perm:
            self._perm = {epoch: np.random.default_rng([self.seed, epoch]).permutation(self.n) if self.shuffle
                          else np.arange(self.n)}
        return self._perm[epoch]

    def take(self, position: int, count: int) -> list[int]:
        """Example indices [count] at stream positions position .. position + count - 1."""
        return [int(self._order(p // self.n)[p % self.n]) for p in range(position, position + count)]


# ------------------------------------------------------------------------------------------ one step


@dataclass
class StepBatch:
    """This rank's trajectories after rollout (and probes), with what the loss needs per sequence."""

    trajs: list[Trajectory]
    golds: list[list[str]]
    rewards: list[float]
    group_ids: list[int]
    is_probe: list[bool]
    old_logprobs: list[torch.Tensor] = field(default_factory=list)  # each [L_i]
    probe_logprobs: list[torch.Tensor] | None = None  # each [L_i]; None without REX-RAG correction
    ref_logprobs: list[torch.Tensor] | None = None

    @classmethod
    def originals(cls, trajs: list[Trajectory], golds: list[list[str]], group_ids: list[int]) -> StepBatch:
        """Finished original trajectories [N] with their golden answers and group ids; rewards = exact match."""
        if not len(trajs) == len(golds) == len(group_ids):
            raise ValueError(f"trajs, golds, group_ids: expected equal lengths, got {len(trajs)}, {len(golds)}, "
                             f"{len(group_ids)}")
        rewards = [exact_match(t.answer, g) for t, g in zip(trajs, golds)]
        return cls(list(trajs), list(golds), rewards, list(group_ids), [False] * len(trajs))

    def subset(self, keep: Sequence[int]) -> StepBatch:
        pick = lambda xs: None if xs is None else [xs[i] for i in keep]  # noqa: E731
        return StepBatch([self.trajs[i] for i in keep], pick(self.golds), pick(self.rewards), pick(self.group_ids),
                         pick(self.is_probe), pick(self.old_logprobs) or [], pick(self.probe_logprobs),
                         pick(self.ref_logprobs))


def _sum_across_ranks(values: dict[str, float]) -> dict[str, float]:
    """Sum of each scalar over ranks (same keys on every rank); collective."""
    return {k: v * du.get_world_size() for k, v in du.all_reduce_mean(values).items()}


def _mean_across_ranks(values: dict[str, float]) -> dict[str, float]:
    """Mean of each scalar over the ranks that report it (keys may differ between ranks); collective."""
    seen: dict[str, list[float]] = {}
    for d in du.gather_objects({k: float(v) for k, v in values.items()}):
        for k, v in d.items():
            seen.setdefault(k, []).append(v)
    return {k: sum(v) / len(v) for k, v in seen.items()}


def _loss_masks(trajs: Sequence[Trajectory]) -> list[torch.Tensor]:
    return [torch.tensor(t.loss_mask, dtype=torch.bool) for t in trajs]


def split_mini_batches(group_ids: Sequence[int], num_mini_batches: int) -> list[list[int]]:
    """Sequence indices of each mini-batch: whole groups (in order of first appearance) dealt as evenly as
    possible, earlier mini-batches taking the extra ones. Probes travel with their source's group."""
    groups: dict[int, list[int]] = {}
    for i, g in enumerate(group_ids):
        groups.setdefault(int(g), []).append(i)
    members = list(groups.values())
    if not 1 <= num_mini_batches <= len(members):
        raise ValueError(f"num_mini_batches: expected 1..{len(members)} (groups on this rank), got {num_mini_batches}")
    q, m = divmod(len(members), num_mini_batches)
    out, start = [], 0
    for k in range(num_mini_batches):
        count = q + (1 if k < m else 0)
        out.append([i for grp in members[start:start + count] for i in grp])
        start += count
    return out


class RLTrainer:
    """The whole run on one rank: construct on every rank (after `ensure_process_group`), then `train()`.

    model / tokenizer / retriever / examples default to what the config names; tests and the benchmark
    pass their own to share them between trainers.
    """

    def __init__(self, cfg: Config, *, model: torch.nn.Module | None = None, tokenizer: Any = None,
                 retriever: Any = None, examples: Sequence[Any] | None = None) -> None:
        from rexrag_fast.engine import EngineConfig, LLMEngine
        from rexrag_fast.rexrag import KeepRatio, PromptTrie, resolve_prompt_pool, tokenize_prompts
        from rexrag_fast.train.actor import ReferencePolicy, ZeroActor, frozen_copy
        from rexrag_fast.train.loss import make_policy_loss_fn

        ensure_process_group()
        self.cfg = cfg
        self.rank, self.world = du.get_rank(), du.get_world_size()
        self.device = du.default_device()
        self.num_mini_batches = cfg.data.train_batch_size // cfg.actor.ppo_mini_batch_size
        per_rank = cfg.data.train_batch_size // self.world
        if per_rank < self.num_mini_batches:
            raise ValueError(
                f"data.train_batch_size = {cfg.data.train_batch_size} over {self.world} ranks leaves {per_rank} "
                f"prompts on a rank, fewer than the {self.num_mini_batches} mini-batches "
                f"(train_batch_size / actor.ppo_mini_batch_size); raise the batch or the mini-batch size")
        self.output_dir = Path(cfg.trainer.output_dir)
        self.ckpt_root = self.output_dir / CHECKPOINT_SUBDIR

        if model is None:
            model, loaded_tok = load_policy(cfg)
            tokenizer = tokenizer if tokenizer is not None else loaded_tok
        if tokenizer is None:
            raise ValueError("tokenizer: pass the model's tokenizer together with model=")
        self.tokenizer = tokenizer
        self.retriever = retriever if retriever is not None else build_retriever(cfg)
        self.examples = list(examples) if examples is not None else load_train_examples(cfg)
        self.stream = PromptStream(len(self.examples), cfg.trainer.seed, cfg.data.shuffle)
        self.model_config = model.config

        # The engine copies the weights, the reference is a frozen copy: both before ZeRO-3 partitions them.
        seqs = max(1, -(-cfg.data.train_batch_size // self.world)) * cfg.rollout.n_agent
        self.engine_config = EngineConfig(
            num_blocks=kv_pool_blocks(cfg, model.config, seqs, self.device), block_size=cfg.rollout.kv_block_size,
            max_num_seqs=min(seqs, 256), enable_prefix_caching=cfg.rollout.use_prefix_cache, device=self.device)
        self.engine = LLMEngine(model, tokenizer=tokenizer, config=self.engine_config)
        self.reference = ReferencePolicy(frozen_copy(model), cfg, device=self.device) \
            if cfg.algorithm.use_kl_loss else None
        self._make_loss_fn = make_policy_loss_fn
        self.actor = ZeroActor(model, cfg, make_policy_loss_fn(cfg.algorithm, fused=cfg.actor.use_fused_kernels),
                               device=self.device, compute_entropy=True)

        rx = cfg.algorithm.rexrag
        self.rexrag = cfg.algorithm.name == "rexrag"
        self.keep_ratio = KeepRatio(rx.keep_ratio, rx.keep_ratio_ewm_alpha)
        self.pool_ids = tokenize_prompts(resolve_prompt_pool(None), tokenizer)
        self.trie = PromptTrie(self.pool_ids)
        self.state = TrainerState(engine_config=self.actor.ds_config)

    # ------------------------------------------------------------------------------------ rollout

    def _prompts(self, indices: Sequence[int]) -> list[list[int]]:
        out = []
        for i in indices:
            ex = self.examples[i]
            ids = encode_prompt(ex.question, self.tokenizer, messages=ex.messages)
            out.append(ids[-self.cfg.data.max_start_length:])  # left truncation keeps the question's end
        return out

    def local_questions(self) -> tuple[list[list[int]], list[list[str]], list[int]]:
        """This rank's share of the next batch: (prompt token ids [P_i], golden answers, group ids), one
        entry per prompt. The group id is the prompt's position in the data stream, unique across ranks
        and steps."""
        batch_idx = self.stream.take(self.state.data_position, self.cfg.data.train_batch_size)
        mine = du.shard_range(len(batch_idx), self.rank, self.world)
        prompts = self._prompts([batch_idx[i] for i in mine])
        golds = [list(self.examples[batch_idx[i]].golden_answers) for i in mine]
        return prompts, golds, [self.state.data_position + i for i in mine]

    def rollout(self, step: int) -> tuple[StepBatch, dict[str, float]]:
        """This rank's rollouts for RL step `step` (1-based): n_agent trajectories per local question with
        their exact-match rewards, then (REX-RAG) the probes of `explore`."""
        cfg = self.cfg
        n = cfg.rollout.n_agent
        prompts, golds, groups = self.local_questions()
        m: dict[str, float] = {}
        gen0 = self.engine.counters.generated_tokens
        t0 = time.perf_counter()
        trajs = run_agent_loop(self.engine, self.retriever, [p for p in prompts for _ in range(n)],
                               agent_config(cfg, derive_seed(cfg.trainer.seed, step, self.rank, _SEED_ROLLOUT)),
                               tokenizer=self.tokenizer)
        m["time/rollout_s"] = time.perf_counter() - t0
        m["count/rollout_generated_tokens"] = float(self.engine.counters.generated_tokens - gen0)
        m["count/rollout_tokens"] = float(sum(len(t) for t in trajs))
        batch = StepBatch.originals(trajs, [g for g in golds for _ in range(n)], [g for g in groups for _ in range(n)])
        if self.rexrag:
            m.update(self.explore(batch, step))
        return batch, m

    def explore(self, batch: StepBatch, step: int) -> dict[str, float]:
        """REX-RAG probes for the originals of `batch`, appended to it in place with their rewards (a probe
        joins its source's group). Dead ends: answered in a searching turn, reward < 1, u < revision_prob."""
        from rexrag_fast.rexrag.probes import make_probes, run_probes

        cfg = self.cfg
        m = dict.fromkeys(_PROBE_KEYS, 0.0)
        rng = np.random.default_rng(derive_seed(cfg.trainer.seed, step, self.rank, _SEED_PROBE_DRAWS))
        pb = make_probes(batch.trajs, batch.rewards, self.pool_ids, cfg.algorithm.rexrag.revision_prob, rng,
                         self.tokenizer, max_turns=cfg.rollout.max_turns)
        if not pb.probes:
            return m
        gen0 = self.engine.counters.generated_tokens
        cached0 = self.engine.counters.cached_tokens
        t0 = time.perf_counter()
        probes = run_probes(self.engine, self.retriever, pb.probes,
                            agent_config(cfg, derive_seed(cfg.trainer.seed, step, self.rank, _SEED_PROBE_ROLLOUT)),
                            tokenizer=self.tokenizer)
        m["time/probe_s"] = time.perf_counter() - t0
        m["count/probe_generated_tokens"] = float(self.engine.counters.generated_tokens - gen0)
        m["count/probe_cached_tokens"] = float(self.engine.counters.cached_tokens - cached0)
        for p, src in zip(probes, pb.sources.tolist()):
            batch.trajs.append(p)
            batch.golds.append(batch.golds[src])
            batch.rewards.append(exact_match(p.answer, batch.golds[src]))
            batch.group_ids.append(batch.group_ids[src])
            batch.is_probe.append(True)
        m["count/probes_made"] = float(len(probes))
        m["count/probe_tokens"] = float(sum(len(p) for p in probes))
        return m

    # ------------------------------------------------------------------------------------ log-probs

    def _packed_logprobs(self, policy: Any, trajs: Sequence[Trajectory]) -> list[torch.Tensor]:
        """Per-token log-probs [L_i] of each trajectory under `policy` (actor or reference), collective."""
        ids = [t.token_ids for t in trajs]
        mbs = pack_micro_batches(ids, self.cfg.actor.max_tokens_per_micro_batch)
        return scatter_back(mbs, policy.compute_logprobs(mbs), len(trajs))

    def correct_and_filter(self, batch: StepBatch) -> tuple[StepBatch, float, dict[str, float]]:
        """REX-RAG filter and policy correction on old log-probs: (kept batch, alpha, metrics).

        Kept: every original and the best-ranked probes within this rank's share of the budget
        keep_probe_count(keep_ratio, train_batch_size, n_agent, multiple_of=world) / world. err (accuracy of
        the originals) and alpha (kept probes / kept trajectories) are taken over all ranks."""
        from rexrag_fast.rexrag import keep_probe_count, prompt_mean_logprobs, select_trajectories
        from rexrag_fast.rexrag.probe_distribution import MIN_ERROR_RATE, probe_logprobs

        cfg = self.cfg
        cu = torch.tensor([0] + np.cumsum([len(t) for t in batch.trajs]).tolist(), dtype=torch.int64)
        explore = torch.tensor([c == Component.EXPLORE_PROMPT for t in batch.trajs for c in t.components])
        scores = prompt_mean_logprobs(torch.cat(batch.old_logprobs), cu, explore)
        budget = keep_probe_count(self.keep_ratio.value, cfg.data.train_batch_size, cfg.rollout.n_agent,
                                  self.world) // self.world
        keep = select_trajectories(np.array(batch.is_probe, dtype=bool), scores, budget).tolist()
        kept = batch.subset(keep)
        probe = np.array(kept.is_probe, dtype=bool)
        r = np.array(kept.rewards, dtype=np.float64)
        tot = _sum_across_ranks({
            "orig": float((~probe).sum()), "orig_right": float((r[~probe] >= 1).sum()),
            "probes": float(probe.sum()), "probes_right": float((r[probe] >= 1).sum()),
        })
        err = max(1.0 - tot["orig_right"] / max(tot["orig"], 1.0), MIN_ERROR_RATE)
        alpha = tot["probes"] / max(tot["orig"] + tot["probes"], 1.0)
        accuracy = tot["probes_right"] / tot["probes"] if tot["probes"] > 0 else 0.0
        m = {"rexrag/alpha": alpha, "rexrag/error_rate": err, "rexrag/probe_accuracy": accuracy,
             "rexrag/probes_kept": tot["probes"], "rexrag/keep_ratio": self.keep_ratio.value,
             "rexrag/probe_budget": float(budget * self.world)}
        if probe.any():
            lens = [len(t) for t in kept.trajs]
            kcu = torch.tensor([0] + np.cumsum(lens).tolist(), dtype=torch.int64)
            log_mu = probe_logprobs(
                torch.cat(kept.old_logprobs), kcu, torch.tensor([x for t in kept.trajs for x in t.token_ids]),
                torch.tensor([c == Component.EXPLORE_PROMPT for t in kept.trajs for c in t.components]),
                torch.tensor([t.prompt_len for t in kept.trajs]), self.trie, err)
            kept.probe_logprobs = list(torch.split(log_mu, lens))
        else:
            kept.probe_logprobs = [torch.full((len(t),), -math.inf) for t in kept.trajs]
        # The EMA folds this step's kept-probe accuracy in after filtering with the previous value.
        self.keep_ratio.update(accuracy)
        return kept, alpha, m

    # ------------------------------------------------------------------------------------ update

    def mini_batches(self, batch: StepBatch) -> list[list[PackedBatch]]:
        """The kept batch as mini-batches (whole groups) of varlen micro-batches with every per-token input
        of the loss: response_mask, old_logprobs, advantages, and ref_logprobs / probe_logprobs when used."""
        from rexrag_fast.train.loss import sequence_advantages

        rewards = torch.tensor(batch.rewards, dtype=torch.float32)
        adv = sequence_advantages(rewards, torch.tensor(batch.group_ids, dtype=torch.int64), self.cfg.algorithm)
        masks = _loss_masks(batch.trajs)
        per_token: dict[str, list[torch.Tensor]] = {
            "response_mask": masks,
            "old_logprobs": batch.old_logprobs,
            "advantages": [adv[i] * masks[i].float() for i in range(len(masks))],
        }
        if batch.ref_logprobs is not None:
            per_token["ref_logprobs"] = batch.ref_logprobs
        if batch.probe_logprobs is not None:
            per_token["probe_logprobs"] = batch.probe_logprobs
        per_seq = {"rewards": rewards, "group_ids": torch.tensor(batch.group_ids)}
        ids = [t.token_ids for t in batch.trajs]
        budget = self.cfg.actor.max_tokens_per_micro_batch
        out = []
        for idx in split_mini_batches(batch.group_ids, self.num_mini_batches):
            plan = first_fit_decreasing([len(ids[i]) for i in idx], budget)
            out.append([pack_sequences(ids, per_token, per_seq, indices=[idx[j] for j in b]) for b in plan])
        return out

    def sync_weights(self) -> float:
        """Gathered ZeRO-3 weights into the rollout engine (collective); returns seconds taken."""
        t0 = time.perf_counter()
        self.engine.update_weights(self.actor.iter_gathered_parameters(device=self.engine.device))
        return time.perf_counter() - t0

    def step(self) -> dict[str, Any]:
        """One RL step (see the module docstring); returns the metrics of the step, reduced over ranks."""
        t_step = time.perf_counter()
        batch, m = self.rollout(self.state.step + 1)
        return self.learn(batch, m, t_step)

    def learn(self, batch: StepBatch, m: dict[str, float] | None = None, t_step: float | None = None
              ) -> dict[str, Any]:
        """The rest of a step after rollout (collective): old log-probs, REX-RAG filter and correction,
        reference log-probs, advantages, actor update, weight sync; advances the trainer state and returns
        the step's metrics reduced over ranks. m: the rollout's metrics; t_step: when the step began."""
        cfg = self.cfg
        m = dict(m or {})
        for key in ("time/rollout_s", "count/rollout_generated_tokens", *_PROBE_KEYS):
            m.setdefault(key, 0.0)
        m.setdefault("count/rollout_tokens", float(sum(len(t) for t, p in zip(batch.trajs, batch.is_probe) if not p)))
        t_step = time.perf_counter() if t_step is None else t_step
        step = self.state.step + 1
        t0 = time.perf_counter()
        batch.old_logprobs = self._packed_logprobs(self.actor, batch.trajs)
        m["time/old_logprob_s"] = time.perf_counter() - t0
        # Engine sampling log-probs vs the actor's recomputation (temperature-scaled both) on sampled tokens:
        # equal up to float noise when the engine runs the actor's weights, so it checks the weight sync.
        sampled = [torch.tensor(t.components) == Component.RESPONSE for t in batch.trajs]
        diff = sum(float(((torch.tensor(t.logprobs) - lp).abs() * mk).sum())
                   for t, lp, mk in zip(batch.trajs, batch.old_logprobs, sampled))
        m["count/response_tokens_all"] = float(sum(int(mk.sum()) for mk in sampled))
        m["sum/rollout_logprob_abs_diff"] = diff

        alpha = 0.0
        orig = [not p for p in batch.is_probe]
        m["sum/reward"] = float(sum(r for r, o in zip(batch.rewards, orig) if o))
        m["count/originals"] = float(sum(orig))
        m["sum/probe_reward"] = float(sum(r for r, p in zip(batch.rewards, batch.is_probe) if p))
        if self.rexrag:
            batch, alpha, rx = self.correct_and_filter(batch)
        else:
            rx = {}
        if self.reference is not None:
            t0 = time.perf_counter()
            batch.ref_logprobs = self._packed_logprobs(self.reference, batch.trajs)
            m["time/ref_logprob_s"] = time.perf_counter() - t0
        m["count/train_tokens"] = float(sum(len(t) for t in batch.trajs))
        m["count/train_sequences"] = float(len(batch.trajs))
        m["sum/searches"] = float(sum(t.num_searches for t, o in zip(batch.trajs, batch.is_probe) if not o))
        m["sum/answered"] = float(sum(t.answer is not None for t, o in zip(batch.trajs, batch.is_probe) if not o))
        m["sum/response_len"] = float(sum(t.num_response_tokens for t, o in zip(batch.trajs, batch.is_probe)
                                          if not o))

        minis = self.mini_batches(batch)
        loss_fn = self._make_loss_fn(cfg.algorithm, fused=cfg.actor.use_fused_kernels, alpha=alpha)
        t0 = time.perf_counter()
        actor_m = self.actor.update(minis, step=self.state.step, loss_fn=loss_fn)
        m["time/update_s"] = time.perf_counter() - t0
        m["time/weight_sync_s"] = self.sync_weights()
        m["time/step_s"] = time.perf_counter() - t_step

        self.state.step = step
        self.state.data_position += cfg.data.train_batch_size
        self.state.epoch = self.state.data_position // len(self.examples)
        self.state.keep_ratio_ewm = self.keep_ratio.value
        return self._reduce_metrics(m, actor_m, rx)

    def _reduce_metrics(self, m: dict[str, float], actor_m: dict[str, float], rx: dict[str, float]
                        ) -> dict[str, Any]:
        tot = _sum_across_ranks({k: v for k, v in m.items() if k.startswith(("count/", "sum/"))})
        times = du.all_reduce_mean({k: v for k, v in m.items() if k.startswith("time/")})
        actor = _mean_across_ranks({k: v for k, v in actor_m.items() if not k.startswith("throughput/")})
        out: dict[str, Any] = dict(actor)
        out.update(rx)
        n_orig = max(tot["count/originals"], 1.0)
        out["reward/mean"] = tot["sum/reward"] / n_orig
        out["reward/em"] = out["reward/mean"]  # the reward is exact match
        probes = tot["count/probes_made"]
        if self.rexrag:
            out["rexrag/probes_made"] = probes
        if probes:
            out["reward/probe_mean"] = tot["sum/probe_reward"] / probes
        out["rollout/searches_mean"] = tot["sum/searches"] / n_orig
        out["rollout/answered_frac"] = tot["sum/answered"] / n_orig
        out["rollout/response_len_mean"] = tot["sum/response_len"] / n_orig
        out["rollout/logprob_abs_diff"] = tot["sum/rollout_logprob_abs_diff"] / max(tot["count/response_tokens_all"], 1)
        out["batch/train_tokens"] = tot["count/train_tokens"]
        out["batch/train_sequences"] = tot["count/train_sequences"]

        def rate(tokens: float, seconds: float) -> float:
            return tokens / seconds if seconds > 0 else 0.0

        out["throughput/rollout_tokens_per_s"] = rate(tot["count/rollout_generated_tokens"], times["time/rollout_s"])
        if probes:
            out["throughput/probe_tokens_per_s"] = rate(tot["count/probe_generated_tokens"], times["time/probe_s"])
            out["rexrag/probe_cached_tokens"] = tot["count/probe_cached_tokens"]
        all_tokens = tot["count/rollout_tokens"] + tot["count/probe_tokens"]
        out["throughput/old_logprob_tokens_per_s"] = rate(all_tokens, times["time/old_logprob_s"])
        if "time/ref_logprob_s" in times:
            out["throughput/ref_logprob_tokens_per_s"] = rate(tot["count/train_tokens"], times["time/ref_logprob_s"])
        epochs = self.cfg.actor.ppo_epochs
        out["throughput/update_tokens_per_s"] = rate(tot["count/train_tokens"] * epochs, times["time/update_s"])
        out["throughput/train_tokens_per_s"] = rate(all_tokens, times["time/step_s"])
        out.update({k.replace("time/", "timing/"): v for k, v in times.items()})
        out["memory/peak_bytes"] = float(max(du.gather_objects(peak_memory_bytes(self.device))))
        return out

    # ------------------------------------------------------------------------------------ run

    def save(self) -> Path:
        """Checkpoint the current state (collective)."""
        self.state.keep_ratio_ewm = self.keep_ratio.value
        self.state.extra = {"rollout_engine": {k: str(v) for k, v in vars(self.engine_config).items()},
                            "config": config_to_dict(self.cfg)}
        return save_checkpoint(self.ckpt_root, self.state, self.actor.engine, keep_last=self.cfg.trainer.keep_last)

    def resume(self) -> bool:
        """Restore the newest good checkpoint (weights, optimizer, trainer state, RNG) and push the weights
        into the engine; False when there is none. Collective."""
        loaded = load_checkpoint(self.ckpt_root, self.actor.engine)
        if loaded is None:
            return False
        for msg in loaded.skipped:
            self._say(msg)
        self.state = loaded.state
        if self.state.keep_ratio_ewm is not None:
            self.keep_ratio.value = float(self.state.keep_ratio_ewm)
        self.sync_weights()
        self._say(f"resumed from {loaded.path} at step {self.state.step}")
        return True

    def export_model(self, path: Path) -> Path:
        """Gathered weights as a Hugging Face model directory (config, safetensors, tokenizer) on rank 0,
        readable by `load_pretrained` / `rexrag-fast eval --model DIR`. Collective."""
        from transformers import AutoModelForCausalLM

        state = self.actor.gathered_state_dict()
        if du.is_main():
            model = AutoModelForCausalLM.from_config(self.model_config).float()
            missing, unexpected = model.load_state_dict(state, strict=False)
            tied = {"lm_head.weight"} if getattr(self.model_config, "tie_word_embeddings", False) else set()
            if unexpected or set(missing) - tied:
                raise RuntimeError(f"export: weights do not fit the model (missing {missing}, unexpected "
                                   f"{unexpected})")
            model.save_pretrained(path)
            self.tokenizer.save_pretrained(path)
        du.barrier()
        return path

    def _say(self, msg: str) -> None:
        if du.is_main():
            print(msg, flush=True)

    def train(self, resume: bool | None = None) -> TrainerState:
        """Run until trainer.max_steps (or a stop signal), logging every step and checkpointing every
        trainer.save_every steps, on a signal and at the end; at the end the model is exported to
        <output_dir>/final. Returns the final trainer state."""
        cfg = self.cfg
        if du.is_main():
            save_config(cfg, self.output_dir / RESOLVED_CONFIG)
        if (cfg.trainer.resume if resume is None else resume) and not self.resume():
            self._say(f"no good checkpoint under {self.ckpt_root}; starting from step 0")
        logger = MetricsLogger(self.output_dir, total_steps=cfg.trainer.max_steps, start_step=self.state.step,
                               enabled=du.is_main(), tensorboard=cfg.trainer.tensorboard,
                               progress_bar=cfg.trainer.progress_bar)
        saved_at = self.state.step if list_checkpoints(self.ckpt_root) else -1
        stopped = False
        try:
            with GracefulStop() as stop:
                while self.state.step < cfg.trainer.max_steps:
                    metrics = self.step()
                    if self.state.step % cfg.trainer.log_every == 0 or self.state.step == cfg.trainer.max_steps:
                        logger.log(self.state.step, metrics)
                    stopped = stop.requested_on_any_rank()
                    every = cfg.trainer.save_every
                    if stopped or (every and self.state.step % every == 0):
                        self.save()
                        saved_at = self.state.step
                    if stopped:
                        self._say(f"stopped by signal after step {self.state.step}; checkpoint saved")
                        break
            if not stopped:
                if saved_at != self.state.step:
                    self.save()
                self.export_model(self.output_dir / FINAL_MODEL_SUBDIR)
        finally:
            logger.close()
        return self.state
