"""Two REX-RAG steps learned with actor.tree_packing on and off, launched by tests/test_tree_trainer.py:

    DS_ACCELERATOR=cpu torchrun --nproc_per_node=2 tests/dist_scripts/tree_packing_steps.py --out DIR

Two RLTrainers (ZeRO-3, same initial weights) differ only in actor.tree_packing. Each step, this rank's
questions get one right and one wrong answered original (a random tiny model never answers by itself, as in
trainer_rexrag_step.py); the tree trainer's REX-RAG stage forks probes from the dead ends on its engine (real
retriever), and both trainers learn the SAME batch (old and reference log-probs, filter, correction, update,
weight sync). Before the first update both actors compute the batch's per-trajectory log-probs, tree-packed
and flat. Rank 0 writes DIR/result.json: both trainers' metrics per step, the log-prob difference, the
batch's sharing, and after the two steps the weights' differences between the trainers (largest, mean, the
fraction of elements above 1e-4) and the mean size of the flat trainer's update.
"""

from __future__ import annotations

import copy
import json
import os
import sys

import torch

from rexrag_fast.train import distributed as du
from rexrag_fast.train.metrics import StepMetrics
from rexrag_fast.train.models import load_policy
from rexrag_fast.train.packing import tree_sharing
from rexrag_fast.train.step_batch import StepBatch
from rexrag_fast.train.trainer import RLTrainer, build_trainer_retriever, load_train_examples

sys.path.insert(0, os.path.dirname(__file__))
from trainer_rexrag_step import answered_originals, out_dir_arg, tiny_rexrag_config  # noqa: E402


def learn_copy(batch: StepBatch) -> StepBatch:
    """A StepBatch of its own over the same (unmutated) trajectories: learn() fills and subsets the batch."""
    return StepBatch(list(batch.trajs), list(batch.golds), list(batch.rewards), list(batch.group_ids),
                     list(batch.is_probe))


def main() -> int:
    out = out_dir_arg()
    base = tiny_rexrag_config(out, "trainer.seed=5", "actor.ppo_mini_batch_size=4")  # rows: 2 mini-batches
    du.init_distributed()
    model, tokenizer = load_policy(base)
    retriever = build_trainer_retriever(base)
    examples = load_train_examples(base)
    trainers = {}
    for mode in ("on", "off"):
        cfg = copy.deepcopy(base)
        cfg.actor.tree_packing = mode
        trainers[mode] = RLTrainer(cfg, model=copy.deepcopy(model), tokenizer=tokenizer, retriever=retriever,
                                   examples=examples)
    initial = {k: v.detach().clone() for k, v in model.state_dict().items()}
    steps, logprob_diff, sharing = [], None, None
    for step in (1, 2):
        lead = trainers["on"]
        batch = answered_originals(lead)
        rollout_m = StepMetrics()
        lead.exploration.explore(batch, step, rollout_m)
        if step == 1:
            on = lead._logprobs(lead.actor, batch.trajs)
            off = trainers["off"]._logprobs(trainers["off"].actor, batch.trajs)
            logprob_diff = du.max_across_ranks(max(float((a - b).abs().max()) for a, b in zip(on, off)))
            ids = [t.token_ids for t in batch.trajs]
            sharing = du.gather_objects(tree_sharing(ids, base.actor.max_tokens_per_micro_batch))
        steps.append({mode: t.learn(learn_copy(batch), rollout_m) for mode, t in trainers.items()})
    weights = {mode: t.actor.gathered_state_dict() for mode, t in trainers.items()}
    diffs = torch.cat([(weights["on"][k] - weights["off"][k]).abs().flatten().float() for k in weights["on"]])
    updates = torch.cat([(weights["off"][k] - initial[k]).abs().flatten().float() for k in weights["off"]])
    if du.is_main():
        with open(os.path.join(out, "result.json"), "w") as f:
            json.dump({"steps": steps, "logprob_diff": logprob_diff, "sharing": sharing,
                       "weight_diff": float(diffs.max()), "weight_diff_mean": float(diffs.mean()),
                       "weight_diff_above_1e-4": float((diffs > 1e-4).float().mean()),
                       "update_mean": float(updates.mean())}, f, default=float)
    du.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
