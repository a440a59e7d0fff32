"""Benchmark stage `train_step`: tokens/s of one full REX-RAG RL step, fused kernels vs the eager path.

Both paths train the same model from the same weights on the SAME batch: one rollout (agent loop on the
rollout engine, embedded world, in-process retriever, REX-RAG probes) is made once and handed to two
trainers that differ only in actor.use_fused_kernels:

    fused: linear_logprobs (no [T, V] logits) + fused_policy_loss
    eager: lm_head -> [T, V] logits -> log_softmax -> gather, verl's loss composed op by op

The learning part of the step (`RLTrainer.learn`: old and reference log-probs, REX-RAG filter and
correction, ppo mini-batch updates on DeepSpeed ZeRO-3 in a 1-rank gloo/nccl group, weight sync into the
engine) is timed per path; a full step = the shared rollout + that path's learning part, in trained tokens
per second. Peak memory of the learning part: the CUDA allocator's peak on a GPU; on the CPU the peak of
live tensor bytes counted per aten op by TensorMemoryTracker (deterministic). Memory is measured in a first,
untimed call (which also warms DeepSpeed up); the timed call repeats the same step on the same batch from
the weights that call left.

Presets: tiny = the demo's model "world-small" (2-layer Qwen2, hidden 128, world tokenizer of 8192 tokens),
untrained, on the embedded world, and a random 2-layer Qwen2 with SmolLM2's 49,152-token vocabulary
("tiny-qwen2", where the [T, V] head dominates and the fused log-probs matter most); 2 questions x 2
rollouts each (an untrained model never answers, so the batch has no probes). qwen2.5-3b = a model of
Qwen2.5-3B's shape (36 layers, hidden 2048, GQA 16/2 heads, MLP 11008, 151,936-token tied head; 3.09B
parameters) with random weights, trained in bf16 on DeepSpeed ZeRO-3 (1 GPU), the world tokenizer feeding it
(its ids lie inside the 151,936-token vocabulary), 8 questions x 4 rollouts, 2 turns of up to 64 tokens,
gradient checkpointing, reference model on the ZeRO-3 engine. The two trainers are built and measured one
after the other, so that only one 3B model with its optimizer state is on the GPU at a time. Every learn row
carries its roofline: the FLOPs of the learning part counted as 2 N per token for each forward (old and
reference log-probs, recomputation under checkpointing) and 4 N for each backward, N = parameters.

Tree packing rows (`_measure_tree`): the same learning part with actor.tree_packing on vs off (fused kernels
both), in the same run, by one trainer that switches the setting between its learn() calls (so the timed
calls start from slightly different weights), on up to two batches per model: "GRPO groups" = a real rollout
of n_agent = 4 trajectories per question (shared prompts only; the embedded-world models, not in --quick),
and "REX-RAG probes" = per question one right and three wrong answered originals (an untrained model never
answers; as tests/dist_scripts/trainer_rexrag_step.py) whose dead ends the REX-RAG stage forks into probes on
the engine (each probe repeats its source up to the cut answer). Each row names the batch's sharing = 1 -
tokens the update's forwards ran over / the flat tokens. On a GPU, tree packs run through FlexAttention.
"""

from __future__ import annotations

import copy
import gc
import os
import time

import torch

from bench.harness import QWEN25_3B, Progress, Roofline, Row, device_peaks, quick, stage
from rexrag_fast.testing import TensorMemoryTracker

TINY = ["data.train_batch_size=2", "actor.ppo_mini_batch_size=2", "rollout.n_agent=2", "rollout.max_turns=1",
        "data.max_prompt_length=512", "data.max_start_length=320", "data.max_response_length=16",
        "actor.max_tokens_per_micro_batch=1024"]
# One list of overrides per measured model.
PRESETS = {
    "tiny": [["model.path=world-small", *TINY], ["model.path=tiny-qwen2", *TINY]],
    "qwen2.5-3b": [["model.path=world-small", "data.train_batch_size=8", "actor.ppo_mini_batch_size=8",
                   "rollout.n_agent=4", "rollout.max_turns=2", "data.max_prompt_length=1024",
                   "data.max_start_length=320", "data.max_response_length=64",
                   "actor.max_tokens_per_micro_batch=8192", "deepspeed.precision=bf16",
                   "deepspeed.gradient_checkpointing=true", "actor.ref_placement=deepspeed"]],
}
# Presets whose model is built here (architecture dict) instead of by load_policy; its tokenizer still comes
# from model.path.
SHAPED_MODELS = {"qwen2.5-3b": QWEN25_3B}
COMMON = ["trainer.seed=3", "actor.lr=1e-5", "trainer.tensorboard=false", "trainer.progress_bar=false",
          "algorithm.rexrag.revision_prob=100", "algorithm.rexrag.keep_ratio=0.5",
          "deepspeed.gradient_checkpointing=false", "actor.ref_placement=cpu",
          "actor.tree_packing=off"]  # fused vs eager on flat packs; the tree rows set it per trainer

# Tree-packing rows: groups of 4 (Search-R1 uses 5), every probe kept.
TREE = ["rollout.n_agent=4", "actor.ppo_mini_batch_size=4", "algorithm.rexrag.keep_ratio=1.0"]
ANSWER_TURN = "<think> I remember this one. </think>\n<answer> {} </answer>"
WRONG_ANSWER = "Nobody In Particular"


def _clone_batch(batch):
    """An independent copy of a rolled-out StepBatch (learn() mutates it); engine completions are shared."""
    out = copy.copy(batch)
    out.trajs = [copy.copy(t) for t in batch.trajs]
    for t in out.trajs:
        t.meta = dict(t.meta)
    out.golds, out.rewards = list(batch.golds), list(batch.rewards)
    out.group_ids, out.is_probe = list(batch.group_ids), list(batch.is_probe)
    return out


@stage("train_step")
def run(preset: str, progress: Progress) -> list[Row]:
    from rexrag_fast.train import distributed as du

    rows: list[Row] = []
    env_before = dict(os.environ)
    # One process group for every model: DeepSpeed caches its groups, so a second init in-process fails.
    du.init_distributed()
    try:
        for overrides in PRESETS[preset][:1] if quick() else PRESETS[preset]:
            arch = SHAPED_MODELS.get(preset)
            rows += _measure(COMMON + overrides, arch, progress)
            rows += _measure_tree(COMMON + overrides + TREE, arch, progress)
    finally:
        du.destroy_process_group()
        for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
            if key not in env_before:
                os.environ.pop(key, None)
    return rows


def shaped_model(arch: dict, seed: int, device: torch.device | str = "cpu"):
    """A Qwen2ForCausalLM of the architecture `arch` (e.g. QWEN25_3B) with random fp32 weights on `device`."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(seed)
    with torch.device(device):
        return Qwen2ForCausalLM(Qwen2Config(**arch)).float().train()


def _learn_flops(n_params: int, tokens: float, cfg) -> float:
    """FLOPs of one learn(): old and reference log-prob forwards (2N per token each), then per epoch a forward
    (2N), a recomputed forward under gradient checkpointing (2N) and a backward (4N)."""
    forwards = 1 + (cfg.actor.ref_placement != "none")  # old, reference
    per_epoch = 2 + (2 if cfg.deepspeed.gradient_checkpointing else 0) + 4
    return n_params * tokens * (2 * forwards + per_epoch * cfg.actor.ppo_epochs)


def _load(overrides: list[str], arch: dict | None, output_dir: str, progress: Progress):
    """(config, model, tokenizer, the rows' model name) of one preset entry: the policy of model.path, or a
    model of the architecture `arch` with random weights (its tokenizer still from model.path)."""
    from rexrag_fast.train.config import load_config
    from rexrag_fast.train.models import load_policy

    base = load_config(os.path.join(os.path.dirname(__file__), "..", "..", "configs", "tiny_cpu.yaml"),
                       overrides + [f"trainer.output_dir={output_dir}"])
    model, tokenizer = load_policy(base)
    model_name = {"tiny-qwen2": "tiny-qwen2, 49k vocab"}.get(base.model.path, base.model.path)
    if arch is not None:
        model = shaped_model(arch, base.trainer.seed)
        model_name = f"Qwen2.5-3B-shaped, random, {sum(p.numel() for p in model.parameters()) / 1e9:.2f}B"
        progress(f"built {model_name}")
    return base, model, tokenizer, model_name


def _measure(overrides: list[str], arch: dict | None, progress: Progress) -> list[Row]:
    """Rows for one model: a rolled-out batch learned by the fused and by the eager path."""
    from rexrag_fast.train.metrics import StepMetrics
    from rexrag_fast.train.trainer import RLTrainer, build_trainer_retriever, load_train_examples

    base, model, tokenizer, model_name = _load(overrides, arch, "/tmp/rexrag_bench_train_step", progress)
    n_params = sum(p.numel() for p in model.parameters())
    retriever = build_trainer_retriever(base)
    examples = load_train_examples(base)
    cuda = torch.cuda.is_available()
    seconds, peak, metrics = {}, {}, {}
    batch = None
    for path, fused in (("fused", True), ("eager", False)):
        cfg = copy.deepcopy(base)
        cfg.actor.use_fused_kernels = fused
        # The last user of `model` takes it itself: one copy fewer of a 3B model in host memory.
        trainer = RLTrainer(cfg, model=model if path == "eager" else copy.deepcopy(model), tokenizer=tokenizer,
                            retriever=retriever, examples=examples)
        progress(f"{path}: trainer built")
        if batch is None:
            t0 = time.perf_counter()
            rollout_m = StepMetrics()
            batch = trainer.rollout(rollout_m)
            probes_made = int(rollout_m.sums.get("count/probes_made", 0))
            rollout_s = time.perf_counter() - t0
            tokens = sum(len(t) for t in batch.trajs)
            progress(f"rollout: {len(batch.trajs)} trajectories ({probes_made} probes), "
                     f"{tokens} tokens in {rollout_s:.1f}s")
        peak[path], seconds[path], metrics[path] = _learn_twice(trainer, batch, cuda)
        progress(f"{path}: learn {seconds[path]:.2f}s, peak {peak[path] / 2**20:.1f} MiB")
        del trainer
        gc.collect()
        if cuda:
            torch.cuda.empty_cache()

    train_tokens = metrics["fused"]["batch/train_tokens"]
    config = (f"{base.model.path}, {len(batch.trajs)} traj ({probes_made} probes), "
              f"{int(train_tokens)} train tokens, ppo_epochs {base.actor.ppo_epochs}, "
              f"{metrics['fused']['actor/optimizer_steps']:.0f} optimizer steps, "
              f"{'cuda' if cuda else 'cpu'} 1 rank ZeRO-{base.deepspeed.zero_stage}")
    step = {p: train_tokens / (rollout_s + seconds[p]) for p in seconds}
    learn = {p: train_tokens / seconds[p] for p in seconds}
    extra = {"rollout_s": rollout_s, "learn_s_fused": seconds["fused"], "learn_s_eager": seconds["eager"],
             "loss_fused": metrics["fused"]["actor/loss"], "loss_eager": metrics["eager"]["actor/loss"]}
    flops = _learn_flops(n_params, train_tokens, base)
    # Bytes: the bf16 (fp32 on CPU) weights read by each forward and backward, fp32 master weights and Adam
    # moments read and written once per optimizer step; activations are not counted (a lower bound).
    weight_bytes = n_params * (2 if cuda else 4)
    steps = int(metrics["fused"]["actor/optimizer_steps"])  # ppo_epochs x mini-batches of this learn()
    moved = weight_bytes * 6 + n_params * 4 * 3 * 2 * steps
    roof = Roofline(moved, flops, seconds["fused"], device_peaks("cuda" if cuda else "cpu"))
    return [
        Row("train_step", f"full RL step ({model_name})", step["fused"], "train tokens/s", step["eager"],
            "eager log-probs + loss", config, extra),
        Row("train_step", f"learn ({model_name})", learn["fused"], "train tokens/s", learn["eager"],
            "eager log-probs + loss", config, {"flops": flops}, roof),
        Row("train_step", f"peak memory of learn ({model_name})", peak["fused"] / 2**20, "MiB", None, "", config,
            {"eager_MiB": peak["eager"] / 2**20}),
        Row("train_step", f"memory ratio ({model_name})", peak["fused"] / peak["eager"], "fused / eager peak", None, "",
            config),
    ]


def _answered_batch(trainer, step: int):
    """This rank's questions, each answered once right and n_agent - 1 times wrong, with the REX-RAG stage's
    probes forked from the wrong ones (dead ends) and run on the engine."""
    from rexrag_fast.agent.trajectory import Component, Trajectory
    from rexrag_fast.train.metrics import StepMetrics
    from rexrag_fast.train.step_batch import StepBatch

    prompts, golds, groups = trainer.rollouts.local_questions(trainer.state.data_position)
    trajs, t_golds, t_groups = [], [], []
    for prompt, gold, group in zip(prompts, golds, groups):
        for k in range(trainer.cfg.rollout.n_agent):
            answer = gold[0] if k == 0 else WRONG_ANSWER
            t = Trajectory.from_prompt(prompt)
            ids = trainer.tokenizer.encode(ANSWER_TURN.format(answer), add_special_tokens=False)
            t.append(ids, Component.RESPONSE, [-1.0] * len(ids))
            t.close_turn("answer", answer, "stop")
            t.answer, t.status = answer, "answer"
            trajs.append(t)
            t_golds.append(gold)
            t_groups.append(group)
    batch = StepBatch.originals(trajs, t_golds, t_groups)
    trainer.exploration.explore(batch, step, StepMetrics())
    return batch


def _learn_twice(trainer, batch, cuda: bool):
    """(peak bytes of an untimed learn, seconds of a timed learn from the same state, the timed metrics)."""
    from rexrag_fast.train.metrics import StepMetrics

    state = copy.deepcopy(trainer.state)
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
        trainer.learn(_clone_batch(batch), StepMetrics())
        peak = torch.cuda.max_memory_allocated() - before
    else:
        with TensorMemoryTracker() as tracker:
            trainer.learn(_clone_batch(batch), StepMetrics())
        peak = tracker.peak_bytes
    trainer.state = state
    if cuda:
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    metrics = trainer.learn(_clone_batch(batch), StepMetrics())
    if cuda:
        torch.cuda.synchronize()
    return peak, time.perf_counter() - t0, metrics


def _measure_tree(overrides: list[str], arch: dict | None, progress: Progress) -> list[Row]:
    """Rows for one model: the learning part with tree packs vs flat packs, one trainer switching
    actor.tree_packing between its learn() calls (one model and optimizer state in memory: a 3B model fits
    once on the GPU, not twice). The embedded-world models learn a GRPO and a REX-RAG batch; the shaped 3B
    model (and --quick) only the REX-RAG batch, which holds both kinds of sharing (prompts and probes)."""
    from rexrag_fast.train.metrics import StepMetrics
    from rexrag_fast.train.trainer import RLTrainer, build_trainer_retriever, load_train_examples

    base, model, tokenizer, model_name = _load(overrides + ["actor.tree_packing=on"],
                                               arch, "/tmp/rexrag_bench_train_step_tree", progress)
    cuda = torch.cuda.is_available()
    # Built with tree packing on: on CUDA that switches the model to FlexAttention for tree packs, while flat
    # packs keep sdpa (ops.tree_logprobs.TREE_ATTENTION), so both paths run on the one trainer.
    trainer = RLTrainer(base, model=model, tokenizer=tokenizer, retriever=build_trainer_retriever(base),
                        examples=load_train_examples(base))
    del model
    batches = {"REX-RAG probes": _answered_batch(trainer, 1)}
    if arch is None and not quick():
        batches = {"GRPO groups": trainer.rollouts.run(1, 0, StepMetrics()), **batches}
    # Off the record: the first learn() creates the optimizer state, which would count in one path's peak only.
    state = copy.deepcopy(trainer.state)
    trainer.learn(_clone_batch(next(iter(batches.values()))), StepMetrics())
    trainer.state = state
    rows = []
    for kind, batch in batches.items():
        peak, seconds, metrics = {}, {}, {}
        for path in ("tree", "flat"):
            trainer.cfg.actor.tree_packing = "on" if path == "tree" else "off"
            peak[path], seconds[path], metrics[path] = _learn_twice(trainer, batch, cuda)
        train_tokens = metrics["flat"]["batch/train_tokens"]
        processed = {p: metrics[p]["actor/update_processed_tokens"] for p in metrics}
        sharing = 1 - processed["tree"] / processed["flat"]
        probes = sum(batch.is_probe)
        progress(f"{model_name}, {kind}: sharing {sharing:.0%}, learn tree {seconds['tree']:.2f}s vs flat "
                 f"{seconds['flat']:.2f}s")
        config = (f"{base.model.path}, {len(batch.trajs)} traj ({probes} probes), {int(train_tokens)} train tokens, "
                  f"sharing {sharing:.1%}, budget {base.actor.max_tokens_per_micro_batch}, "
                  f"{'cuda' if cuda else 'cpu'} 1 rank ZeRO-{base.deepspeed.zero_stage}")
        learn = {p: train_tokens / seconds[p] for p in seconds}
        extra = {"sharing": sharing, "learn_s_tree": seconds["tree"], "learn_s_flat": seconds["flat"]}
        label = f"{model_name}, {kind}, sharing {sharing:.0%}"
        rows += [
            Row("train_step", f"learn, tree packs ({label})", learn["tree"], "train tokens/s", learn["flat"],
                "flat packs", config, extra),
            Row("train_step", f"update tokens processed, tree packs ({label})", processed["tree"], "tokens",
                processed["flat"], "flat packs", config),
            Row("train_step", f"peak memory of learn, tree packs ({label})", peak["tree"] / 2**20, "MiB",
                peak["flat"] / 2**20, "flat packs", config),
        ]
    del trainer
    gc.collect()
    if cuda:
        torch.cuda.empty_cache()
    return rows
