"""The DeepSpeed ZeRO-3 actor: log-probs of packed batches, verl-style PPO updates, gathered weights.

How the trainer uses it (one step, per rank; `trainer.py`):

    actor = ZeroActor(model, cfg, loss_fn=policy_loss_fn)        # once; same initial weights on every rank
    ref = ReferencePolicy(frozen_copy(model), cfg)                 # once, when algorithm.use_kl_loss
    old = actor.compute_logprobs(micro_batches)                    # packing.pack_micro_batches of the step
    ref_lp = ref.compute_logprobs(micro_batches)
    metrics = actor.update(plan_mini_batches(...), step=step, loss_fn=this step's loss)   # ppo_epochs x minis
    engine.update_weights(actor.iter_gathered_parameters())        # weight sync (collective!)

`loss_fn(logprobs [T], entropy [T] | None, batch: PackedBatch) -> (loss 0-d, metrics)` computes the loss of
ONE micro-batch aggregated over that micro-batch alone (e.g. token-mean over its response tokens). The actor
re-weights it so the gradient is the one of the loss aggregated over the whole mini-batch on all ranks:

    L_mini = sum_mb  L_mb * w_mb / W * world_size      (DeepSpeed averages gradients over ranks)
    w_mb = response tokens of mb (token-mean) or sequences of mb (seq-mean-*), W = sum of w_mb on all ranks

so splitting into micro-batches or ranks does not change the update (up to float summation order).

Log-probs use the causal-LM convention of the packed layout: logprobs[t] = log pi(x_t | x_<t of the same
sequence) / temperature-scaled as in the rollout, 0 at the first token of every sequence (nothing predicts
it, and it is a prompt token, so the response mask is 0 there). `use_fused_kernels` selects
`rexrag_fast.ops.linear_logprobs` (no [T, V] logits) or the eager path (materialised logits, log_softmax).
A tree pack (`batch.tree`, packing.py) runs the model once over its tree nodes (`ops.tree_logprobs`: shared
prefixes once, attention to ancestors) and expands the per-node results to the same flat [T] layout through
tree.token_node, so the loss sees the same tensors; autograd's backward of that gather sums the flat
gradients back onto the shared nodes.

ZeRO-3 needs every rank to run the same number of forward/backward passes (parameters are gathered
collectively), so micro-batch counts are equalised across ranks with zero-weight repeats.
"""

from __future__ import annotations

import copy
import math
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

import torch
from torch import nn

from rexrag_fast.train import distributed as dist_utils
from rexrag_fast.train.config import Config
from rexrag_fast.train.config_checks import merge_deepspeed_config, read_deepspeed_json
from rexrag_fast.train.finite_guard import FiniteGuard, is_finite
from rexrag_fast.train.metrics import peak_memory_bytes
from rexrag_fast.train.packing import PackedBatch

LossFn = Callable[[torch.Tensor, "torch.Tensor | None", PackedBatch], "tuple[torch.Tensor, Mapping[str, Any]]"]


# ------------------------------------------------------------------------------------------ log-probs


def forward_inputs(batch: PackedBatch) -> tuple[torch.Tensor, ...]:
    """The positional arguments of `PolicyLogprobs.forward` for a flat or a tree pack."""
    if batch.tree is None:
        return batch.input_ids, batch.position_ids, batch.cu_seqlens
    t = batch.tree
    return t.input_ids, t.position_ids, batch.cu_seqlens, t.parent, t.subtree_end, t.token_node


def shift_to_tokens(per_position: torch.Tensor, cu_seqlens: torch.Tensor) -> torch.Tensor:
    """Move values computed at position t for token t+1 onto token t+1; 0 at every sequence start. [T] -> [T]."""
    out = torch.zeros_like(per_position)
    out[1:] = per_position[:-1]
    out[cu_seqlens[:-1].long()] = 0
    return out


class PolicyLogprobs(nn.Module):
    """Wrap a Hugging Face causal LM so that forward(packed batch) returns per-token log-probs (and entropy).

    forward(input_ids [T], position_ids [T], cu_seqlens [B+1]) -> (logprobs [T] fp32, entropy [T] fp32 | None).
    Sequences are kept apart by the restarting position_ids (transformers builds a block-diagonal causal
    mask from them when no attention mask is given; flash-attention uses them as varlen boundaries).
    Tree pack: forward(tree input_ids [N], depths [N], cu_seqlens [B+1], parent [N], subtree_end [N],
    token_node [T]) -> the same [T] outputs (`forward_inputs(batch)` builds either argument list).
    The lm-head weight is registered as an external parameter so ZeRO-3 gathers it for the fused op,
    which reads it outside the lm-head module. flex_trees: tree packs through FlexAttention (an O(N) block
    mask) instead of a dense [N, N] mask (`ops.tree_logprobs.enable_flex_tree_attention`; used on CUDA).
    """

    def __init__(self, model: nn.Module, *, fused: bool, temperature: float = 1.0, compute_entropy: bool = False,
                 flex_trees: bool = False) -> None:
        super().__init__()
        if flex_trees:
            from rexrag_fast.ops.tree_logprobs import enable_flex_tree_attention

            enable_flex_tree_attention(model)
        self.model = model
        self.fused = fused
        self.temperature = float(temperature)
        self.compute_entropy = compute_entropy
        self._external_registered = False

    def register_external_lm_head(self) -> None:
        """Call after ZeRO-3 partitioning (deepspeed.initialize) when using the fused path."""
        if self.fused and not self._external_registered:
            weight = self.model.get_output_embeddings().weight
            if hasattr(weight, "ds_id"):
                from deepspeed.runtime.zero.partition_parameters import register_external_parameter

                register_external_parameter(self, weight)
            self._external_registered = True

    def forward(self, input_ids: torch.Tensor, position_ids: torch.Tensor, cu_seqlens: torch.Tensor,
                parent: torch.Tensor | None = None, subtree_end: torch.Tensor | None = None,
                token_node: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
        from rexrag_fast.ops.causal_lm import causal_lm_logprobs
        from rexrag_fast.ops.tree_logprobs import tree_logprobs

        if token_node is not None:
            out = tree_logprobs(self.model, input_ids, position_ids, parent, subtree_end,
                                temperature=self.temperature, return_entropy=self.compute_entropy, fused=self.fused)
            lp, ent = out if self.compute_entropy else (out, None)
            return lp[token_node], ent[token_node] if ent is not None else None
        out = causal_lm_logprobs(self.model, input_ids, position_ids=position_ids, temperature=self.temperature,
                                 return_entropy=self.compute_entropy, fused=self.fused)
        lp, ent = out if self.compute_entropy else (out, None)
        lp = shift_to_tokens(lp.float(), cu_seqlens)
        ent = shift_to_tokens(ent.float(), cu_seqlens) if ent is not None else None
        return lp, ent


# ----------------------------------------------------------------------------------------- DeepSpeed


def resolve_precision(cfg: Config, device: torch.device) -> str:
    """'bf16' or 'fp32': auto means bf16 on a GPU and fp32 on the CPU."""
    p = cfg.deepspeed.precision
    if p == "auto":
        return "bf16" if device.type == "cuda" else "fp32"
    return p


def build_deepspeed_config(cfg: Config, device: torch.device) -> dict[str, Any]:
    """The DeepSpeed config dict for the actor. Gradient accumulation is driven by the actor (variable
    micro-batch counts), so DeepSpeed sees one micro-batch per step and a boundary flag set by hand.
    deepspeed.config_file, when set, is merged over it (`config_checks.merge_deepspeed_config`)."""
    ds = cfg.deepspeed
    zero: dict[str, Any] = {"stage": ds.zero_stage}
    if ds.zero_stage >= 1:
        zero["contiguous_gradients"] = True
        zero["overlap_comm"] = device.type == "cuda"
    if ds.offload_optimizer:
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": device.type == "cuda"}
    if ds.offload_param:
        zero["offload_param"] = {"device": "cpu", "pin_memory": device.type == "cuda"}
    if ds.zero_stage == 3:
        zero["stage3_gather_16bit_weights_on_model_save"] = False
    generated = {
        "train_micro_batch_size_per_gpu": 1,
        "gradient_accumulation_steps": 1,
        "gradient_clipping": cfg.actor.grad_clip,
        "zero_optimization": zero,
        "bf16": {"enabled": resolve_precision(cfg, device) == "bf16"},
        "zero_allow_untested_optimizer": True,
        "zero_force_ds_cpu_optimizer": False,  # torch AdamW also with optimizer offload
        "steps_per_print": 1 << 30,
        "wall_clock_breakdown": False,
    }
    if ds.config_file is None:
        return generated
    return merge_deepspeed_config(generated, read_deepspeed_json(ds.config_file))


def warmup_lr(base_lr: float, step: int, warmup_steps: int) -> float:
    """verl's constant schedule with linear warmup: lr = base * min(1, step / warmup_steps) (base if 0)."""
    if warmup_steps <= 0:
        return base_lr
    return base_lr * min(1.0, step / warmup_steps)


def equalise_across_ranks(batches: Sequence[PackedBatch], device: torch.device) -> list[tuple[PackedBatch, bool]]:
    """`batches` paired with True, then (smallest batch, False) repeats up to the largest count on any rank.

    ZeRO-3 gathers parameters collectively in every forward, so all ranks must run as many forwards as
    the busiest one; the repeats' results are dropped and their loss weight is 0."""
    n = len(batches)
    most = int(dist_utils.max_across_ranks(n))
    if n == 0 and most > 0:
        raise ValueError("a rank has no micro-batch while others have some; shard prompts evenly across ranks")
    pairs = [(b, True) for b in batches]
    if most > n:
        smallest = min(batches, key=lambda b: b.num_tokens)
        pairs += [(smallest, False)] * (most - n)
    return pairs


def _to_float(v: Any) -> float:
    return float(v.detach().float().item()) if isinstance(v, torch.Tensor) else float(v)


class ZeroActor:
    """A causal LM trained with DeepSpeed (ZeRO stage from config) by a caller-supplied policy loss.

    Construct on every rank after `distributed.init_distributed()`, with the same initial weights on every
    rank (ZeRO-3 partitions them at construction). fp32 on the CPU, bf16 on a GPU unless configured.
    """

    def __init__(self, model: nn.Module, cfg: Config, loss_fn: LossFn, *, device: torch.device | None = None,
                 compute_entropy: bool = True) -> None:
        import deepspeed

        self.cfg = cfg
        self.loss_fn = loss_fn
        self.device = device or dist_utils.default_device()
        if cfg.deepspeed.gradient_checkpointing:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        if hasattr(model, "config"):
            model.config.use_cache = False
        self.module = PolicyLogprobs(model, fused=cfg.actor.use_fused_kernels,
                                     temperature=cfg.rollout.temperature, compute_entropy=compute_entropy,
                                     flex_trees=self.device.type == "cuda" and cfg.actor.tree_packing != "off")
        self.ds_config = build_deepspeed_config(cfg, self.device)
        params = [p for p in self.module.parameters() if p.requires_grad]
        optimizer = torch.optim.AdamW(params, lr=cfg.actor.lr, betas=tuple(cfg.actor.betas),
                                      weight_decay=cfg.actor.weight_decay)
        self.engine, self.optimizer, _, _ = deepspeed.initialize(
            model=self.module, optimizer=optimizer, config=self.ds_config)
        self.module.register_external_lm_head()
        total = cfg.trainer.max_steps
        self.warmup_steps = int(cfg.actor.lr_warmup_steps_ratio * total)
        self.finite_guard = FiniteGuard(cfg.actor.max_nonfinite_updates)

    # -------------------------------------------------------------------------------------- forward

    def _forward(self, batch: PackedBatch) -> tuple[torch.Tensor, torch.Tensor | None]:
        return self.engine(*forward_inputs(batch.to(self.device)))

    @torch.no_grad()
    def compute_logprobs(self, batches: Sequence[PackedBatch]) -> list[torch.Tensor]:
        """Log-probs [T_i] (fp32, on the CPU) of each packed batch under the current weights, no gradient.

        Collective under ZeRO-3: every rank calls it; when ranks hold different numbers of batches the
        shorter lists are padded with repeats internally (their results dropped)."""
        self.engine.eval()
        out = []
        for b, counts in equalise_across_ranks(batches, self.device):
            lp = self._forward(b)[0].cpu()  # every rank runs every forward: ZeRO-3 gathers are collective
            if counts:
                out.append(lp)
        self.engine.train()
        return out

    # --------------------------------------------------------------------------------------- update

    def _weight(self, batch: PackedBatch) -> float:
        if self.cfg.algorithm.loss_agg_mode == "token-mean":
            mask = batch.per_token.get("response_mask")
            if mask is None:
                raise KeyError("batch.per_token['response_mask'] is required (the loss counts response tokens)")
            return float(mask.sum())
        return float(batch.num_sequences)

    def update(self, mini_batches: Sequence[Sequence[PackedBatch]], step: int = 0, loss_fn: LossFn | None = None
               ) -> dict[str, float]:
        """ppo_epochs x len(mini_batches) optimizer steps, as verl's dp_actor.update_policy.

        mini_batches: this rank's mini-batches, each a list of packed micro-batches whose per_token dict holds
        what `loss_fn` reads (at least response_mask). Every rank passes the same number of mini-batches.
        step: RL steps completed so far (sets the warmup learning rate).
        loss_fn: this step's loss (e.g. with this step's REX-RAG alpha); default the one given at construction.
        Returns metrics, the same on every rank: actor/loss, actor/<each loss metric>, actor/entropy (when
        computed), all averaged over micro-batches of all ranks and epochs with the loss weights; actor/grad_norm
        (mean over optimizer steps), actor/lr, actor/update_tokens (flat tokens trained, all ranks, all epochs),
        actor/update_processed_tokens (tokens the forwards ran over: fewer on tree packs), and this rank's
        throughput/update_tokens_per_s and memory/peak_bytes (CUDA max allocated, or peak RSS on the CPU).
        """
        loss_fn = loss_fn or self.loss_fn
        n_mini = len(mini_batches)
        if dist_utils.is_initialized():
            counts = dist_utils.gather_objects(n_mini)
            if len(set(counts)) != 1:
                raise ValueError(f"mini_batches: every rank must pass the same number, got {counts} by rank")
        lr = warmup_lr(self.cfg.actor.lr, step, self.warmup_steps)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        self.engine.train()
        sums: dict[str, float] = {}
        weight_seen = 0.0
        grad_norms: list[float] = []
        tokens = processed = 0
        t0 = time.perf_counter()
        for epoch in range(self.cfg.actor.ppo_epochs):
            for mini_index, mini in enumerate(mini_batches):
                losses_finite = True
                plan = equalise_across_ranks(mini, self.device)
                total_w = dist_utils.all_reduce_floats([sum(self._weight(m) for m, counts in plan if counts)])[0]
                world = dist_utils.get_world_size()
                for i, (mb, counts) in enumerate(plan):
                    self.engine.set_gradient_accumulation_boundary(i == len(plan) - 1)
                    lp, ent = self._forward(mb)
                    loss, metrics = loss_fn(lp, ent, mb.to(self.device))
                    losses_finite = losses_finite and bool(torch.isfinite(loss.detach()))
                    w = self._weight(mb) if counts else 0.0
                    scale = w / total_w * world if total_w > 0 else 0.0
                    self.engine.backward(loss * scale, scale_wrt_gas=False)
                    if counts and w > 0:
                        tokens += mb.num_tokens
                        processed += mb.processed_tokens
                        weight_seen += w
                        sums["actor/loss"] = sums.get("actor/loss", 0.0) + _to_float(loss) * w
                        for k, v in metrics.items():
                            key = f"actor/{k}"
                            sums[key] = sums.get(key, 0.0) + _to_float(v) * w
                        if ent is not None:
                            m = mb.per_token["response_mask"].to(ent.device).float() if "response_mask" in \
                                mb.per_token else torch.ones_like(ent)
                            ent_mean = float((ent.detach() * m).sum() / m.sum().clamp_min(1))
                            sums["actor/entropy"] = sums.get("actor/entropy", 0.0) + ent_mean * w
                # Stage 0 leaves whole, already all-reduced gradients on the parameters and reports no norm
                # of its own; the ZeRO optimizers (stages 1-3) compute it over their partitions.
                own_norm = self._unsharded_grad_norm() if self.cfg.deepspeed.zero_stage == 0 else None
                finite = self.finite_guard.agree(losses_finite and is_finite(own_norm))
                if finite or self.cfg.deepspeed.zero_stage > 0:
                    # ZeRO 1-3 skip a step whose gradient norm is not finite themselves, on all ranks together.
                    self.engine.step()
                else:
                    self.engine.zero_grad()  # stage 0 would apply the non-finite gradients: drop them
                gn = self.engine.get_global_grad_norm()
                gn = _to_float(gn) if gn is not None else own_norm
                what = f"ranks {self.finite_guard.bad_ranks}" if not finite else f"gradient norm {gn}"
                self.finite_guard.record(finite and is_finite(gn), what=what, where=(
                    f"RL step {step + 1}, epoch {epoch + 1}, mini-batch {mini_index + 1} of {n_mini}"))
                if gn is not None and is_finite(gn):
                    grad_norms.append(gn)
        # Metrics are weighted means over every rank's micro-batches (the same weights as the loss), so every
        # rank reports the global value. Keys are the same on all ranks (same loss_fn, same entropy setting).
        keys = sorted(sums)
        totals = dist_utils.all_reduce_floats([sums[k] for k in keys] + [weight_seen, float(tokens), float(processed)])
        weight_seen, tokens_all, processed_all = totals[-3], totals[-2], totals[-1]
        out = {k: v / weight_seen for k, v in zip(keys, totals)} if weight_seen > 0 else {}
        if grad_norms:
            out["actor/grad_norm"] = sum(grad_norms) / len(grad_norms)
        out["actor/lr"] = lr
        out["actor/optimizer_steps"] = float(self.cfg.actor.ppo_epochs * n_mini)
        elapsed = time.perf_counter() - t0
        out["actor/update_tokens"] = tokens_all
        out["actor/update_processed_tokens"] = processed_all
        out["throughput/update_tokens_per_s"] = tokens / elapsed if elapsed > 0 else math.nan  # this rank
        out["memory/peak_bytes"] = float(peak_memory_bytes(self.device))  # this rank
        out.update(self.finite_guard.metrics())
        return out

    def _unsharded_grad_norm(self) -> float:
        """||g||_2 over all parameters' full gradients (pre-clipping), for stage 0."""
        sq = sum(float(p.grad.detach().float().pow(2).sum()) for p in self.module.parameters() if p.grad is not None)
        return math.sqrt(sq)

    # --------------------------------------------------------------------------------- weight sync

    def iter_gathered_parameters(self, device: torch.device | str = "cpu") -> Iterator[tuple[str, torch.Tensor]]:
        """(name, full tensor) for every parameter of the wrapped model, gathered one at a time from the ZeRO-3
        shards (Hugging Face names, e.g. model.layers.0.self_attn.q_proj.weight; tied weights once).

        Collective: every rank must iterate to the end together. Tensors are copies on `device`."""
        from deepspeed.runtime.zero.partition_parameters import GatheredParameters

        for name, p in self.module.model.named_parameters():
            with GatheredParameters([p], modifier_rank=None):
                yield name, p.detach().to(device, copy=True)

    def gathered_state_dict(self, device: torch.device | str = "cpu") -> dict[str, torch.Tensor]:
        """All parameters gathered (see `iter_gathered_parameters`); collective, returns on every rank."""
        return dict(self.iter_gathered_parameters(device))


# ----------------------------------------------------------------------------------------- reference


class ReferencePolicy:
    """A frozen copy of the initial policy for the KL term.

    placement 'cpu': a plain module on the CPU (each rank holds a full copy; fine for small models).
    placement 'deepspeed': a ZeRO-3 inference engine without optimizer (parameters sharded like the actor's).
    Pass a copy made BEFORE the actor's deepspeed.initialize partitions the original (`copy.deepcopy`).
    """

    def __init__(self, model: nn.Module, cfg: Config, *, device: torch.device | None = None) -> None:
        placement = cfg.actor.ref_placement
        if placement == "none":
            raise ValueError("actor.ref_placement is 'none': no reference model is configured")
        self.device = torch.device("cpu") if placement == "cpu" else device or dist_utils.default_device()
        for p in model.parameters():
            p.requires_grad_(False)
        self.module = PolicyLogprobs(model.eval(), fused=cfg.actor.use_fused_kernels,
                                     temperature=cfg.rollout.temperature, compute_entropy=False,
                                     flex_trees=self.device.type == "cuda" and cfg.actor.tree_packing != "off")
        self.engine: Any
        if placement == "cpu":
            self.device = torch.device("cpu")
            self.engine = self.module
        else:
            import deepspeed

            ds = build_deepspeed_config(cfg, self.device)
            ds["zero_optimization"] = {"stage": 3 if cfg.deepspeed.zero_stage == 3 else 0}
            if cfg.deepspeed.offload_param and cfg.deepspeed.zero_stage == 3:
                ds["zero_optimization"]["offload_param"] = {"device": "cpu"}
            self.engine, *_ = deepspeed.initialize(model=self.module, config=ds)
            self.module.register_external_lm_head()
        self.engine.eval()

    @torch.no_grad()
    def compute_logprobs(self, batches: Sequence[PackedBatch]) -> list[torch.Tensor]:
        """Reference log-probs [T_i] (fp32, CPU) per batch; collective with placement 'deepspeed'."""
        plan = equalise_across_ranks(batches, self.device) if self.engine is not self.module else \
            [(b, True) for b in batches]
        out = []
        for b, counts in plan:
            lp = self.engine(*forward_inputs(b.to(self.device)))[0].float().cpu()
            if counts:
                out.append(lp)
        return out


def frozen_copy(model: nn.Module) -> nn.Module:
    """A deep copy for `ReferencePolicy`; take it before the actor partitions `model`."""
    ref = copy.deepcopy(model)
    for p in ref.parameters():
        p.requires_grad_(False)
    return ref.eval()
