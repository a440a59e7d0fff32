"""A real multi-process ZeRO-3 training run on a fixed synthetic batch, launched by tests/test_zero3_actor.py:

    DS_ACCELERATOR=cpu torchrun --nproc_per_node=2 --master_port=PORT tests/dist_scripts/zero3_update.py \\
        --out DIR [--max-steps N] [--save-every K] [--sigterm-at-step S] [--resume] [--eager] [--ref cpu]
        [--mini-batch-prompts P] [--rewards per-prompt] [--nan-steps S ... [--nan-rank R] [--nan-everywhere]]

Each RL step: this rank's prompts (shard of a fixed synthetic set, n responses each) get fresh 0/1 rewards
from the global torch RNG (standing in for rollouts, so resume must restore RNG state), GRPO advantages,
old and reference log-probs from the actor / reference model, synthetic probe log-probs on every group's
second response (REX-RAG correction with alpha 0.25), then `ZeroActor.update` with the config's policy loss
(fused op, or the eager reference with --eager): ppo_epochs x mini-batches of packed micro-batches.
Metrics go to DIR/metrics.jsonl (rank 0), checkpoints to DIR/checkpoints, and the gathered weights before
and after to DIR/weights_step{S}.pt.
"""

from __future__ import annotations

import argparse
import math
import os
import random
import signal
import sys

import numpy as np
import torch

from rexrag_fast.engine.loaders import tiny_model
from rexrag_fast.engine.weights import DecoderWeights
from rexrag_fast.train import distributed as du
from rexrag_fast.train.actor import ReferencePolicy, ZeroActor, frozen_copy
from rexrag_fast.train.checkpoint import TrainerState, load_checkpoint, save_checkpoint
from rexrag_fast.train.config import load_config
from rexrag_fast.train.loss import make_policy_loss_fn, sequence_advantages
from rexrag_fast.train.metrics import MetricsLogger
from rexrag_fast.train.packing import plan_mini_batches
from rexrag_fast.train.signals import GracefulStop

VOCAB = 96
PROMPTS = 6  # whole set; each rank takes its shard
N_AGENT = 2
ALPHA = 0.25  # REX-RAG probe share in the synthetic batch


def synthetic_trajectories(prompt_ids: range) -> tuple[list[list[int]], list[torch.Tensor], list[int]]:
    """Token ids, response masks and group ids for the given prompts, a fixed function of the prompt id."""
    ids, masks, groups = [], [], []
    for p in prompt_ids:
        g = torch.Generator().manual_seed(1000 + p)
        prompt = torch.randint(0, VOCAB, (int(torch.randint(4, 9, (1,), generator=g)),), generator=g).tolist()
        for _ in range(N_AGENT):
            resp_len = int(torch.randint(3, 12, (1,), generator=g))
            resp = torch.randint(0, VOCAB, (resp_len,), generator=g).tolist()
            ids.append(prompt + resp)
            mask = torch.zeros(len(prompt) + resp_len, dtype=torch.bool)
            mask[len(prompt):] = True
            masks.append(mask)
            groups.append(p)
    return ids, masks, groups


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    ap.add_argument("--max-steps", type=int, default=3)
    ap.add_argument("--save-every", type=int, default=0)
    ap.add_argument("--sigterm-at-step", type=int, default=0, help="send SIGTERM to itself during this step")
    ap.add_argument("--resume", action="store_true")
    ap.add_argument("--eager", action="store_true")
    ap.add_argument("--ref", default="deepspeed", choices=["cpu", "deepspeed"])
    ap.add_argument("--zero-stage", type=int, default=3)
    ap.add_argument("--offload", action="store_true", help="deepspeed.offload_optimizer (and offload_param at stage 3)")
    ap.add_argument("--mini-batch-prompts", type=int, default=3, help="actor.ppo_mini_batch_size (of 6 prompts)")
    ap.add_argument("--rewards", default="rng", choices=["rng", "per-prompt"],
                    help="rng: from each rank's global RNG; per-prompt: a function of (step, prompt), the same "
                         "whatever the number of ranks")
    ap.add_argument("--nan-steps", type=int, nargs="*", default=[],
                    help="RL steps (1-based) at which --nan-rank gets a NaN old log-prob on a response token")
    ap.add_argument("--nan-rank", type=int, default=1)
    ap.add_argument("--nan-everywhere", action="store_true", help="in every micro-batch, not only the first")
    ap.add_argument("--max-nonfinite", type=int, default=3, help="actor.max_nonfinite_updates")
    args = ap.parse_args()

    os.makedirs(args.out, exist_ok=True)
    du.init_distributed()
    rank, world = du.get_rank(), du.get_world_size()
    cfg = load_config(None, [
        f"trainer.output_dir={args.out}", f"trainer.max_steps={args.max_steps}", "trainer.seed=7",
        f"trainer.save_every={args.save_every}", "trainer.keep_last=2",
        "data.train_batch_size=6", "data.max_prompt_length=32", "data.max_start_length=16",
        "data.max_response_length=16", f"rollout.n_agent={N_AGENT}",
        "actor.lr=2e-3", "actor.ppo_epochs=2", f"actor.ppo_mini_batch_size={args.mini_batch_prompts}",
        "actor.max_tokens_per_micro_batch=48",
        f"actor.use_fused_kernels={'false' if args.eager else 'true'}", f"actor.ref_placement={args.ref}",
        f"deepspeed.zero_stage={args.zero_stage}", "deepspeed.precision=fp32", "deepspeed.gradient_checkpointing=true",
        f"deepspeed.offload_optimizer={str(args.offload).lower()}",
        f"deepspeed.offload_param={str(args.offload and args.zero_stage == 3).lower()}",
        "algorithm.kl_coef=0.01", f"actor.max_nonfinite_updates={args.max_nonfinite}",
    ])
    model = tiny_model("qwen2", vocab_size=VOCAB, seed=cfg.trainer.seed, hidden_size=32, intermediate_size=64,
                       max_position_embeddings=128, tie_word_embeddings=False).train()
    ref = ReferencePolicy(frozen_copy(model), cfg)
    loss_fn = make_policy_loss_fn(cfg.algorithm, fused=cfg.actor.use_fused_kernels, alpha=ALPHA)
    actor = ZeroActor(model, cfg, loss_fn)
    random.seed(cfg.trainer.seed + rank)
    np.random.seed(cfg.trainer.seed + rank)
    torch.manual_seed(cfg.trainer.seed + rank)

    ckpt_root = os.path.join(args.out, "checkpoints")
    state = TrainerState(engine_config=actor.ds_config)
    if args.resume:
        loaded = load_checkpoint(ckpt_root, actor.engine)
        if loaded is None:
            raise SystemExit("--resume: no good checkpoint found")
        state = loaded.state
        if rank == 0:
            for msg in loaded.skipped:
                print(msg, flush=True)
            print(f"resumed from {loaded.path} at step {state.step}", flush=True)
    else:
        weights = actor.gathered_state_dict()
        if rank == 0:
            torch.save(weights, os.path.join(args.out, "weights_step0.pt"))

    my_prompts = du.shard_range(PROMPTS, rank, world)
    ids, masks, groups = synthetic_trajectories(my_prompts)
    group_t = torch.tensor(groups)
    num_mini = cfg.data.train_batch_size // cfg.actor.ppo_mini_batch_size
    logger = MetricsLogger(args.out, total_steps=cfg.trainer.max_steps, start_step=state.step, enabled=rank == 0,
                           tensorboard=False, progress_bar=False)
    with GracefulStop() as stop:
        while state.step < cfg.trainer.max_steps:
            if args.rewards == "rng":
                rewards = torch.bernoulli(torch.full((len(ids),), 0.5))
            else:
                g = torch.Generator().manual_seed(state.step)
                every = torch.bernoulli(torch.full((PROMPTS * N_AGENT,), 0.5), generator=g)
                rewards = every[my_prompts.start * N_AGENT: my_prompts.stop * N_AGENT]
            adv = sequence_advantages(rewards, group_t, cfg.algorithm)
            per_token = {"response_mask": masks, "advantages": [adv[i] * masks[i].float() for i in range(len(ids))]}
            minis = plan_mini_batches(ids, num_mini, cfg.actor.max_tokens_per_micro_batch, per_token,
                                      {"rewards": rewards, "group_ids": group_t}, group_size=N_AGENT)
            flat = [mb for mini in minis for mb in mini]
            for mb, old, ref_lp in zip(flat, actor.compute_logprobs(flat), ref.compute_logprobs(flat)):
                mb.per_token["old_logprobs"] = old
                mb.per_token["ref_logprobs"] = ref_lp
                # The second response of every group stands in for a REX-RAG probe: log mu = old - 0.1 on it,
                # -inf on originals.
                is_probe = (mb.seq_index % N_AGENT == 1).repeat_interleave(mb.seqlens().long())
                mb.per_token["probe_logprobs"] = torch.where(is_probe, old - 0.1, torch.full_like(old, -math.inf))
            if state.step + 1 in args.nan_steps and rank == args.nan_rank:
                for mb in flat if args.nan_everywhere else flat[:1]:
                    first_response = int(mb.per_token["response_mask"].nonzero()[0, 0])
                    mb.per_token["old_logprobs"][first_response] = math.nan
            if args.sigterm_at_step == state.step + 1:
                os.kill(os.getpid(), signal.SIGTERM)
            m = actor.update(minis, step=state.step)
            state.step += 1
            state.data_position += PROMPTS
            m["reward/mean"] = float(rewards.mean())
            logger.log(state.step, du.all_reduce_mean(m))
            stopping = stop.requested_on_any_rank()
            if stopping or (cfg.trainer.save_every and state.step % cfg.trainer.save_every == 0):
                save_checkpoint(ckpt_root, state, actor.engine, keep_last=cfg.trainer.keep_last)
            if stopping:
                if rank == 0:
                    print(f"stopped by signal after step {state.step}", flush=True)
                break
    weights = actor.gathered_state_dict()
    if rank == 0:
        torch.save(weights, os.path.join(args.out, f"weights_step{state.step}.pt"))
    # Weight sync into the rollout engine's own weights, streamed one gathered ZeRO-3 parameter at a time.
    runner_weights = DecoderWeights(actor.module.model.config, torch.device("cpu"), torch.float32)
    runner_weights.load(actor.iter_gathered_parameters())
    if rank == 0 and torch.equal(runner_weights.lm_head, weights["lm_head.weight"]) and \
            torch.equal(runner_weights.embed, weights["model.embed_tokens.weight"]):
        print("weight sync ok", flush=True)
    logger.close()
    du.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
