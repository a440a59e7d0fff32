"""Warm start: a short supervised phase on demonstration trajectories before RL (single process, CPU, fp32).

Loss (per batch of packed trajectories, T tokens):

    loss = - sum_t m[t+1] * log p(x[t+1] | x[..t]) / sum_t m[t+1]

where m is the trajectory's loss mask (RESPONSE tokens: the model-written reasoning, queries and answer;
prompts and retrieved <information> tokens are 0), and the log-probs come from `causal_lm_logprobs`
(packed, no [T, V] logits kept). AdamW with linear warmup then constant learning rate; batches are drawn
in a seeded order, so the same demonstrations, model and config give the same weights.

The result is saved as a Hugging Face checkpoint directory (save_pretrained + tokenizer), usable as
model.path of a training config, by `load_pretrained` and by `rexrag-fast eval --model DIR`.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from rexrag_fast.agent.trajectory import Trajectory
from rexrag_fast.ops import causal_lm_logprobs
from rexrag_fast.train.packing import pack_trajectories


@dataclass(frozen=True)
class WarmStartConfig:
    """steps: optimizer steps; batch_size: trajectories per step; lr: peak AdamW learning rate reached
    after warmup_steps; weight_decay: AdamW's; seed: batch order; grad_clip: max global grad norm;
    micro_batch_tokens: tokens packed into one forward (gradients accumulate over a step's micro-batches).

    Micro-batches keep packed attention cheap: a packed forward attends over a block-diagonal [T, T] mask,
    so its cost grows with T^2 even though only the diagonal blocks count."""

    steps: int = 200
    batch_size: int = 8
    lr: float = 1e-3
    warmup_steps: int = 10
    weight_decay: float = 0.0
    grad_clip: float = 1.0
    seed: int = 0
    micro_batch_tokens: int = 1024

    def __post_init__(self) -> None:
        for name in ("steps", "batch_size", "micro_batch_tokens"):
            if getattr(self, name) < 1:
                raise ValueError(f"WarmStartConfig.{name} must be >= 1, got {getattr(self, name)}")
        if not self.lr > 0:
            raise ValueError(f"WarmStartConfig.lr must be > 0, got {self.lr}")
        if self.warmup_steps < 0 or self.grad_clip <= 0:
            raise ValueError(f"WarmStartConfig: warmup_steps >= 0 and grad_clip > 0 expected, got "
                             f"{self.warmup_steps} and {self.grad_clip}")


def masked_nll_sum(model: torch.nn.Module, trajectories: Sequence[Trajectory]) -> tuple[torch.Tensor, int]:
    """(sum of -log p over the loss-masked tokens of `trajectories` (differentiable), number of such tokens).

    Packed: input_ids [T], cu_seqlens [B+1]; lp[t] = log p(x[t+1] | prefix) from causal_lm_logprobs, so the
    target mask is the loss mask shifted left by one (a sequence's first token is a PROMPT token, never a
    target, so no position pairs tokens of two different sequences)."""
    batch = pack_trajectories(trajectories)
    lp = causal_lm_logprobs(model, batch.input_ids, cu_seqlens=batch.cu_seqlens)
    target = torch.zeros_like(lp)
    target[:-1] = batch.per_token["response_mask"][1:].float()
    return -(lp * target).sum(), int(target.sum())


def masked_nll(model: torch.nn.Module, trajectories: Sequence[Trajectory]) -> torch.Tensor:
    """Mean negative log-likelihood of the loss-masked tokens of `trajectories` (scalar, differentiable)."""
    total, n = masked_nll_sum(model, trajectories)
    if n == 0:
        raise ValueError("masked_nll: the trajectories hold no loss-masked (model-written) tokens")
    return total / n


def split_by_tokens(trajectories: Sequence[Trajectory], budget: int) -> list[list[Trajectory]]:
    """Consecutive groups of at most `budget` tokens (a longer trajectory forms a group of its own)."""
    groups: list[list[Trajectory]] = []
    used = budget
    for t in trajectories:
        if used + len(t.token_ids) > budget:
            groups.append([])
            used = 0
        groups[-1].append(t)
        used += len(t.token_ids)
    return groups


def train_warm_start(
    model: torch.nn.Module,
    trajectories: Sequence[Trajectory],
    config: WarmStartConfig,
    *,
    progress: bool = False,
) -> list[float]:
    """Fit `model` (in place, fp32, train mode) to the demonstrations; returns the loss of each step [steps].

    Batches: a seeded permutation of the trajectories cut into batch_size pieces, reshuffled each epoch."""
    if not trajectories:
        raise ValueError("train_warm_start: no demonstration trajectories")
    model.float().train()
    opt = torch.optim.AdamW(model.parameters(), lr=config.lr, weight_decay=config.weight_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / config.warmup_steps) if config.warmup_steps else 1.0)
    gen = torch.Generator().manual_seed(config.seed)
    order: list[int] = []
    losses: list[float] = []
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=config.steps, desc="warm start", unit="step")
    for _ in range(config.steps):
        if len(order) < config.batch_size:
            order += torch.randperm(len(trajectories), generator=gen).tolist()
        idx, order = order[: config.batch_size], order[config.batch_size :]
        step_trajectories = [trajectories[i] for i in idx]
        n = sum(int(sum(t.loss_mask[1:])) for t in step_trajectories)
        if n == 0:
            raise ValueError("train_warm_start: a batch holds no loss-masked (model-written) tokens")
        opt.zero_grad(set_to_none=True)
        loss = 0.0
        for group in split_by_tokens(step_trajectories, config.micro_batch_tokens):
            part, _ = masked_nll_sum(model, group)
            (part / n).backward()
            loss += float(part.detach()) / n
        torch.nn.utils.clip_grad_norm_(model.parameters(), config.grad_clip)
        opt.step()
        sched.step()
        losses.append(loss)
        if bar is not None:
            bar.update(1)
            bar.set_postfix(loss=f"{losses[-1]:.3f}")
    if bar is not None:
        bar.close()
    model.eval()
    return losses


def warm_start_key(model_spec: dict[str, Any], demo_hash: str, config: WarmStartConfig) -> str:
    """Content hash (16 hex digits) of what determines the warm-started weights: the model's description,
    the demonstrations' content hash and the training config."""
    blob = json.dumps({"model": model_spec, "demos": demo_hash, "config": asdict(config)}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def save_checkpoint_dir(model: torch.nn.Module, tokenizer: Any, out_dir: str | os.PathLike[str],
                        info: dict[str, Any] | None = None) -> Path:
    """Write model (save_pretrained, safetensors) and tokenizer into `out_dir` atomically: into a temporary
    sibling renamed into place, so an interrupted save never leaves a directory that looks complete.
    `info` is written as warm_start.json next to them."""
    out = Path(out_dir)
    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    tmp.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    if info is not None:
        (tmp / "warm_start.json").write_text(json.dumps(info, indent=1, sort_keys=True))
    if out.exists():
        import shutil

        shutil.rmtree(out)
    tmp.rename(out)
    return out
