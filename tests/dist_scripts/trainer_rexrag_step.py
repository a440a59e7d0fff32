"""One REX-RAG learning step of `RLTrainer` on answered originals, launched by tests/test_trainer_loop.py:

    DS_ACCELERATOR=cpu torchrun --nproc_per_node=2 tests/dist_scripts/trainer_rexrag_step.py --out DIR

A random tiny model never answers, so the originals are written here: for each of this rank's questions
(n_agent = 2) one trajectory answers with the first golden answer (reward 1) and one with a wrong answer
(reward 0). The REX-RAG stage's `explore` then forks probes from the dead ends (revision_prob 100) and runs them on
the engine with the real retriever, and `RLTrainer.learn` does the rest of the step (old and reference
log-probs, filter with keep_ratio 1, policy correction, ZeRO-3 update, weight sync); a second step on the
same originals runs as plain GRPO (the GRPO stage in the same seam). Every torch.distributed collective that
rexrag_fast calls runs through a wrapper asserting that its tensors are on `distributed.comm_device()` (the
class of bug NCCL would reject on a GPU). Rank 0 writes DIR/result.json: both steps' metrics, the probes made
on each rank, which parameters the REX-RAG step changed, and the collectives checked.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import traceback

import torch
import torch.distributed as dist

from rexrag_fast.agent.trajectory import Component, Trajectory
from rexrag_fast.train import distributed as du
from rexrag_fast.train.config import Config, load_config
from rexrag_fast.train.metrics import StepMetrics
from rexrag_fast.train.rexrag_stage import GRPOStage
from rexrag_fast.train.step_batch import StepBatch
from rexrag_fast.train.trainer import RLTrainer

ANSWER_TURN = "<think> I remember this one. </think>\n<answer> {} </answer>"
WRONG_ANSWER = "Nobody In Particular"


def answered(prompt: list[int], answer: str, tokenizer) -> Trajectory:
    t = Trajectory.from_prompt(prompt)
    ids = tokenizer.encode(ANSWER_TURN.format(answer), add_special_tokens=False)
    t.append(ids, Component.RESPONSE, [-1.0] * len(ids))
    t.close_turn("answer", answer, "stop")
    t.answer, t.status = answer, "answer"
    return t


CHECKED = {"calls": 0}


def check_collective_devices() -> None:
    """Wrap the tensor collectives: a tensor from rexrag_fast code must be on du.comm_device()."""
    for name in ("all_reduce", "broadcast", "all_gather", "reduce"):
        real = getattr(dist, name)

        def checked(*args, _real=real, _name=name, **kwargs):
            caller = traceback.extract_stack(limit=2)[0].filename
            if "rexrag_fast" in caller:
                tensors = [a for a in args if isinstance(a, torch.Tensor)]
                for t in tensors:
                    assert t.device == du.comm_device(), f"{_name} from {caller}: tensor on {t.device}"
                CHECKED["calls"] += 1
            return _real(*args, **kwargs)

        setattr(dist, name, checked)


def tiny_rexrag_config(out: str, *extra: str) -> Config:
    """tiny-qwen2 on the embedded world, 4 questions x 2, one search turn, every dead end probed and kept."""
    return load_config(os.path.join(os.path.dirname(__file__), "..", "..", "configs", "tiny_cpu.yaml"), [
        "model.path=tiny-qwen2", f"trainer.output_dir={out}", "data.train_batch_size=4", "rollout.n_agent=2",
        "rollout.max_turns=1", "data.max_prompt_length=512", "data.max_start_length=320",
        "data.max_response_length=16", "actor.max_tokens_per_micro_batch=1024", "actor.lr=1e-3",
        "algorithm.rexrag.revision_prob=100", "algorithm.rexrag.keep_ratio=1.0",
        "trainer.tensorboard=false", "trainer.progress_bar=false", *extra,
    ])


def answered_originals(trainer: RLTrainer) -> StepBatch:
    """This rank's next questions, each answered once right (reward 1) and once wrong (reward 0)."""
    prompts, golds, groups = trainer.rollouts.local_questions(trainer.state.data_position)
    trajs, t_golds, t_groups = [], [], []
    for p, g, gid in zip(prompts, golds, groups):
        for ans in (g[0], WRONG_ANSWER):
            trajs.append(answered(p, ans, trainer.tokenizer))
            t_golds.append(g)
            t_groups.append(gid)
    return StepBatch.originals(trajs, t_golds, t_groups)


def out_dir_arg() -> str:
    """The --out directory of a dist script (created)."""
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    out = ap.parse_args().out
    os.makedirs(out, exist_ok=True)
    return out


def main() -> int:
    out = out_dir_arg()
    cfg = tiny_rexrag_config(out, "trainer.seed=11", "actor.ppo_mini_batch_size=4")
    du.init_distributed()
    check_collective_devices()
    trainer = RLTrainer(cfg)
    before = trainer.actor.gathered_state_dict()
    batch = answered_originals(trainer)
    trajs, t_golds, t_groups = list(batch.trajs), list(batch.golds), list(batch.group_ids)
    rollout_m = StepMetrics()
    trainer.exploration.explore(batch, 1, rollout_m)
    probes = [(t.meta["probe_of"], g, len(t.turns), t.status) for t, g, p in
              zip(batch.trajs, batch.group_ids, batch.is_probe) if p]
    metrics = trainer.learn(batch, rollout_m)
    after = trainer.actor.gathered_state_dict()
    # The same originals once more with algorithm.name = grpo: no probes, no correction (alpha 0).
    trainer.cfg.algorithm.name = "grpo"
    trainer.exploration = GRPOStage()
    grpo = trainer.learn(StepBatch.originals(trajs, t_golds, t_groups))
    all_probes = du.gather_objects({"rank": du.get_rank(), "probes": probes, "originals": len(trajs),
                                    "rewards": batch.rewards, "groups": batch.group_ids})
    if du.is_main():
        changed = {k: not torch.equal(before[k], after[k]) for k in before}
        with open(os.path.join(out, "result.json"), "w") as f:
            json.dump({"metrics": metrics, "grpo": grpo, "ranks": all_probes, "changed": changed,
                   "collectives_checked": CHECKED["calls"]}, f,
                      default=float)
    du.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
