"""The RL training loop: one step on every rank reads as DESIGN.md's data flow.

    batch   = rollouts.run(step)                       n_agent trajectories per local question, EM rewards
    exploration.explore(batch)                         REX-RAG: probes forked from dead ends (GRPO: nothing)
    old lp  = actor.compute_logprobs(packed batch)     recomputed by the actor, as verl does
    batch, alpha = exploration.filter_and_correct(batch)   REX-RAG: kept probes, log mu, alpha (GRPO: 0)
    ref lp  = reference.compute_logprobs(...)          when algorithm.use_kl_loss
    update  = actor.update(mini-batches of whole groups, packed under actor.max_tokens_per_micro_batch;
              advantages per group, loss = fused_policy_loss or the eager composition with this step's alpha);
              ceil(kept rows of all ranks / actor.ppo_mini_batch_size) mini-batches, as the reference counts
              (`optimizer_steps_per_epoch`)
    sync    = engine.update_weights(actor.iter_gathered_parameters())   the engine bumps its prefix-cache
              namespace, so no stale KV is reused
    metrics = StepMetrics reduced over ranks -> <output_dir>/metrics.jsonl (+ TensorBoard, tqdm, curves.png)
    checkpoint every trainer.save_every steps, on SIGTERM/SIGINT and at the end (`checkpoint.py`)

Where each job lives: the prompts and the engine in `rollout.py`, the GRPO / REX-RAG seam in
`rexrag_stage.py`, packing and mini-batches in `packing.py`, the ZeRO-3 actor in `actor.py`, the loss in
`loss.py`, counting and reducing in `metrics.py`, collectives in `distributed.py`, model names in `models.py`.

Determinism and resume. Nothing in a step depends on RNG state carried between steps: the data order is a
function of (seed, epoch), and the rollout sampling seeds and the dead-end / prompt draws are derived from
(seed, step, rank, purpose). So a run resumed from the checkpoint of step k (weights, optimizer, data
position, keep-ratio average) repeats steps k+1.. of the uninterrupted run exactly on the CPU.

Output under trainer.output_dir: config.yaml (the resolved config), metrics.jsonl, tensorboard/, curves.png,
checkpoints/step_NNNNNN/ (the newest trainer.keep_last; with hf/, a Hugging Face model directory, every
trainer.export_hf_every steps), and final/ (the trained weights as a Hugging Face
model directory with its tokenizer, for `rexrag-fast eval --model DIR`) when the run reaches max_steps.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from rexrag_fast.agent.trajectory import Trajectory
from rexrag_fast.train import distributed as du
from rexrag_fast.train.checkpoint import TrainerState, list_checkpoints, load_checkpoint, save_checkpoint
from rexrag_fast.train.config import Config, config_to_dict, resolve_max_steps, save_config
from rexrag_fast.train.metrics import MetricsLogger, StepMetrics, logger_options, peak_memory_bytes, summarize_step
from rexrag_fast.train.models import load_policy
from rexrag_fast.train.packing import (
    PackedBatch,
    optimizer_steps_per_epoch,
    pack_micro_batches,
    pack_tree_micro_batches,
    plan_mini_batches,
    scatter_back,
    tree_packing_enabled,
)
from rexrag_fast.train.rexrag_stage import build_exploration
from rexrag_fast.train.rollout import Rollouts, build_engine
from rexrag_fast.train.signals import GracefulStop
from rexrag_fast.train.step_batch import StepBatch

CHECKPOINT_SUBDIR = "checkpoints"
FINAL_MODEL_SUBDIR = "final"
CHECKPOINT_HF_SUBDIR = "hf"  # trainer.export_hf_every: a Hugging Face model dir inside the checkpoint
RESOLVED_CONFIG = "config.yaml"


def build_trainer_retriever(cfg: Config) -> Any:
    """The embedded world's in-process retriever (retriever.embedded; rank 0 builds the world index before
    the others load it) or a checked HTTP client of retriever.url."""
    from rexrag_fast.retrieval.retriever import WORLD, build_retriever

    if not cfg.retriever.embedded:
        return build_retriever(cfg.retriever.url, timeout_s=cfg.retriever.timeout_s, key="retriever.url")
    if du.is_main():
        retriever = build_retriever(WORLD)
    du.barrier()
    return retriever if du.is_main() else build_retriever(WORLD)


def load_train_examples(cfg: Config) -> list[Any]:
    """QAExamples of data.train_files, or the embedded world's train split when the list is empty."""
    from rexrag_fast.data.datasets import load_many, load_world_split

    examples = load_many(cfg.data.train_files) if cfg.data.train_files else load_world_split("train")
    if not examples:
        raise ValueError(f"data.train_files: no examples in {cfg.data.train_files or 'the embedded world'}")
    return examples


class RLTrainer:
    """The whole run on one rank: construct on every rank, then `train()`.

    model / tokenizer / retriever / examples default to what the config names; tests and the benchmark
    pass their own to share them between trainers.
    """

    def __init__(self, cfg: Config, *, model: torch.nn.Module | None = None, tokenizer: Any = None,
                 retriever: Any = None, examples: Sequence[Any] | None = None) -> None:
        from rexrag_fast.train.actor import ReferencePolicy, ZeroActor, frozen_copy
        from rexrag_fast.train.loss import make_policy_loss_fn

        du.init_distributed()
        self.cfg = cfg
        self.device = du.default_device()
        # mini-batches of a step without kept probes; probes add up to ceil(probes / ppo_mini_batch_size)
        self.num_mini_batches = -(-cfg.data.train_batch_size * cfg.rollout.n_agent // cfg.actor.ppo_mini_batch_size)
        per_rank = cfg.data.train_batch_size // du.get_world_size()
        if per_rank < self.num_mini_batches:
            raise ValueError(
                f"data.train_batch_size = {cfg.data.train_batch_size} over {du.get_world_size()} ranks leaves "
                f"{per_rank} prompts on a rank, fewer than the {self.num_mini_batches} mini-batches of whole "
                f"groups (train_batch_size x rollout.n_agent / actor.ppo_mini_batch_size); raise the batch or the "
                f"mini-batch size")
        self.output_dir = Path(cfg.trainer.output_dir)
        self.ckpt_root = self.output_dir / CHECKPOINT_SUBDIR

        if model is None:
            model, loaded_tok = load_policy(cfg)
            tokenizer = tokenizer if tokenizer is not None else loaded_tok
        if tokenizer is None:
            raise ValueError("tokenizer: pass the model's tokenizer together with model=")
        self.tokenizer = tokenizer
        retriever = retriever if retriever is not None else build_trainer_retriever(cfg)
        examples = list(examples) if examples is not None else load_train_examples(cfg)
        cfg.trainer.max_steps = resolve_max_steps(cfg, len(examples))  # trainer.total_epochs, verl's key
        self.model_config = model.config

        # The engine copies the weights, the reference is a frozen copy: both before ZeRO-3 partitions them.
        self.engine = build_engine(cfg, model, tokenizer, self.device)
        self.reference = ReferencePolicy(frozen_copy(model), cfg, device=self.device) \
            if cfg.algorithm.use_kl_loss else None
        self.actor = ZeroActor(model, cfg, make_policy_loss_fn(cfg.algorithm, fused=cfg.actor.use_fused_kernels),
                               device=self.device, compute_entropy=True)
        self.rollouts = Rollouts(cfg, engine=self.engine, retriever=retriever, tokenizer=tokenizer,
                                 examples=examples)
        self.exploration = build_exploration(cfg, engine=self.engine, retriever=retriever, tokenizer=tokenizer,
                                             agent_config=self.rollouts.agent_config)
        self.state = TrainerState(engine_config=self.actor.ds_config)

    # ------------------------------------------------------------------------------------ one step

    def step(self) -> dict[str, Any]:
        """One RL step (see the module docstring); returns the metrics of the step, reduced over ranks."""
        t_step = time.perf_counter()
        metrics = StepMetrics()
        batch = self.rollout(metrics)
        return self.learn(batch, metrics, t_step)

    def rollout(self, metrics: StepMetrics) -> StepBatch:
        """This rank's trajectories of the next step: originals, then the exploration stage's probes."""
        step = self.state.step + 1
        batch = self.rollouts.run(step, self.state.data_position, metrics)
        self.exploration.explore(batch, step, metrics)
        return batch

    def learn(self, batch: StepBatch, metrics: StepMetrics | None = None, t_step: float | None = None
              ) -> dict[str, Any]:
        """The rest of a step after rollout (collective): old log-probs, filter and correction, reference
        log-probs, actor update, weight sync; advances the trainer state and returns the step's metrics
        reduced over ranks. metrics: what the rollout counted; t_step: when the step began."""
        m = metrics.copy() if metrics is not None else StepMetrics()
        t_step = time.perf_counter() if t_step is None else t_step
        batch.count_rollout(m)
        with m.timer("time/old_logprob_s"):
            batch.old_logprobs = self._logprobs(self.actor, batch.trajs)
        batch.count_sampling_drift(m)
        batch, alpha, rexrag_metrics = self.exploration.filter_and_correct(batch)
        if self.reference is not None:
            with m.timer("time/ref_logprob_s"):
                batch.ref_logprobs = self._logprobs(self.reference, batch.trajs)
        batch.count_train_batch(m)
        from rexrag_fast.train.loss import make_policy_loss_fn

        loss_fn = make_policy_loss_fn(self.cfg.algorithm, fused=self.cfg.actor.use_fused_kernels, alpha=alpha)
        with m.timer("time/update_s"):
            minis = self.mini_batches(batch, self.count_mini_batches(batch))
            actor_metrics = self.actor.update(minis, step=self.state.step, loss_fn=loss_fn)
        with m.timer("time/weight_sync_s"):
            self.sync_weights()
        m.set_time("time/step_s", time.perf_counter() - t_step)

        self.state.step += 1
        self.state.data_position += self.cfg.data.train_batch_size
        self.state.epoch = self.state.data_position // len(self.rollouts.examples)
        sums, times = m.reduce()
        out: dict[str, Any] = du.mean_across_ranks(
            {k: v for k, v in actor_metrics.items() if not k.startswith("throughput/")})
        out.update(rexrag_metrics)
        out.update(summarize_step(sums, times, ppo_epochs=self.cfg.actor.ppo_epochs,
                                  rexrag=self.cfg.algorithm.name == "rexrag"))
        out["memory/peak_bytes"] = du.max_across_ranks(float(peak_memory_bytes(self.device)))
        return out

    def _logprobs(self, policy: Any, trajs: Sequence[Trajectory]) -> list[torch.Tensor]:
        """Per-token log-probs [L_i] of each trajectory under `policy` (actor or reference), collective."""
        token_ids = [t.token_ids for t in trajs]
        budget = self.cfg.actor.max_tokens_per_micro_batch
        mbs = pack_tree_micro_batches(token_ids, budget) if self.use_tree_packing(token_ids) else \
            pack_micro_batches(token_ids, budget)
        return scatter_back(mbs, policy.compute_logprobs(mbs), len(trajs))

    def count_mini_batches(self, batch: StepBatch) -> int:
        """This step's mini-batches per epoch, equal on every rank (`optimizer_steps_per_epoch` of the kept
        rows summed over ranks, capped by the fewest groups on a rank). Collective."""
        rows = du.all_reduce_floats([float(len(batch.trajs))], "sum")[0]
        neg_groups = du.all_reduce_floats([-float(len(set(batch.group_ids)))], "max")[0]
        return optimizer_steps_per_epoch(int(rows), self.cfg.actor.ppo_mini_batch_size, int(-neg_groups))

    def mini_batches(self, batch: StepBatch, num_mini_batches: int | None = None) -> list[list[PackedBatch]]:
        """The kept batch as mini-batches (whole groups) of varlen micro-batches with every per-token input
        of the loss: response_mask, old_logprobs, advantages, and ref_logprobs / probe_logprobs when used.
        num_mini_batches: None counts them (`count_mini_batches`, collective)."""
        from rexrag_fast.train.loss import sequence_advantages

        rewards = torch.tensor(batch.rewards, dtype=torch.float32)
        adv = sequence_advantages(rewards, torch.tensor(batch.group_ids, dtype=torch.int64), self.cfg.algorithm)
        masks = [torch.tensor(t.loss_mask, dtype=torch.bool) for t in batch.trajs]
        per_token: dict[str, list[torch.Tensor]] = {
            "response_mask": masks,
            "old_logprobs": batch.old_logprobs,
            "advantages": [adv[i] * masks[i].float() for i in range(len(masks))],
        }
        if batch.ref_logprobs is not None:
            per_token["ref_logprobs"] = batch.ref_logprobs
        if batch.probe_logprobs is not None:
            per_token["probe_logprobs"] = batch.probe_logprobs
        if num_mini_batches is None:
            num_mini_batches = self.count_mini_batches(batch)
        token_ids = [t.token_ids for t in batch.trajs]
        return plan_mini_batches(token_ids, num_mini_batches,
                                 self.cfg.actor.max_tokens_per_micro_batch, per_token,
                                 {"rewards": rewards, "group_ids": torch.tensor(batch.group_ids)},
                                 group_ids=batch.group_ids, tree=self.use_tree_packing(token_ids))

    def use_tree_packing(self, token_ids: Sequence[Sequence[int]]) -> bool:
        """Whether this pass over `token_ids` uses tree packs (`tree_packing_enabled` of actor.tree_packing)."""
        return tree_packing_enabled(self.cfg.actor.tree_packing, token_ids, self.cfg.actor.max_tokens_per_micro_batch)

    def validate(self) -> dict[str, float]:
        """Greedy held-out EM of the current weights (`validation.validate`: val/em, val/em/<source>). Collective."""
        from rexrag_fast.train.validation import load_val_examples, validate

        if getattr(self, "_val_examples", None) is None:
            self._val_examples = load_val_examples(self.cfg)
        t0 = time.perf_counter()
        out = validate(self.engine, self.rollouts.retriever, self._val_examples, self.rollouts.agent_config(None),
                       tokenizer=self.tokenizer, template=self.rollouts.template,
                       batch_size=self.cfg.data.val_batch_size)
        out["time/validation_s"] = time.perf_counter() - t0
        return out

    def sync_weights(self) -> None:
        """Gathered ZeRO-3 weights into the rollout engine (collective)."""
        self.engine.update_weights(self.actor.iter_gathered_parameters(device=self.engine.device))

    # ------------------------------------------------------------------------------------ run

    def save(self) -> Path:
        """Checkpoint the current state (collective)."""
        self.state.keep_ratio_ewm = self.exploration.state_dict().get("keep_ratio_ewm")
        self.state.extra = {"rollout_engine": {k: str(v) for k, v in vars(self.engine.config).items()},
                            "config": config_to_dict(self.cfg)}
        path = save_checkpoint(self.ckpt_root, self.state, self.actor.engine, keep_last=self.cfg.trainer.keep_last)
        every = self.cfg.trainer.export_hf_every
        if every and self.state.step % every == 0:
            self.export_model(path / CHECKPOINT_HF_SUBDIR)
        return path

    def resume(self, checkpoint: Path | None = None) -> bool:
        """Restore the newest good checkpoint (or `checkpoint`, a step directory: weights, optimizer, trainer
        state, RNG) and push the weights into the engine; False when there is none. Collective."""
        loaded = load_checkpoint(self.ckpt_root, self.actor.engine, checkpoint=checkpoint)
        if loaded is None:
            return False
        for msg in loaded.skipped:
            self._say(msg)
        self.state = loaded.state
        self.exploration.load_state_dict({"keep_ratio_ewm": self.state.keep_ratio_ewm})
        self.sync_weights()
        self._say(f"resumed from {loaded.path} at step {self.state.step}")
        return True

    def export_model(self, path: Path) -> Path:
        """Gathered weights as a Hugging Face model directory (config, safetensors, tokenizer) on rank 0,
        readable by `load_pretrained` / `rexrag-fast eval --model DIR`. Collective."""
        from rexrag_fast.train.actor import resolve_precision
        from rexrag_fast.train.models import write_hf_model

        state = self.actor.gathered_state_dict()
        if du.is_main():  # in the training dtype: bf16 on a GPU
            dtype = torch.bfloat16 if resolve_precision(self.cfg, self.device) == "bf16" else torch.float32
            write_hf_model(self.model_config, state, self.tokenizer, path, dtype)
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
        mode = cfg.trainer.resume_mode if resume is None else ("auto" if resume else "disable")
        if mode != "disable" and not self.resume(None if mode == "auto" else Path(mode)) and resume:
            self._say(f"no good checkpoint under {self.ckpt_root}; starting from step 0")
        logger = MetricsLogger(self.output_dir, total_steps=cfg.trainer.max_steps, start_step=self.state.step,
                               enabled=du.is_main(), progress_bar=cfg.trainer.progress_bar,
                               **logger_options(cfg.trainer, config_to_dict(cfg)))
        saved_at = self.state.step if list_checkpoints(self.ckpt_root) else -1
        stopped = False
        try:
            with GracefulStop() as stop:
                while self.state.step < cfg.trainer.max_steps:
                    metrics = self.step()
                    if cfg.trainer.test_freq > 0 and self.state.step % cfg.trainer.test_freq == 0:
                        metrics.update(self.validate())
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
