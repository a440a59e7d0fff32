"""REX-RAG: mixed sampling with probe rollouts, and the policy correction of the loss.

The algorithm of arXiv 2508.08149 as MiliLab/REX-RAG implements it, on plain data (token ids, packed
arrays/tensors, rewards), independent of the agent's Trajectory type:

- `prompts`: the pool of exploratory prompts (our own ~30, or a user YAML/JSON list), their tokenisation and
  uniform draws;
- `dead_ends`: which answered originals get a probe;
- `filtering`: keep all originals and the best-ranked probes within an adaptive budget (keep_ratio EMA);
- `probe_distribution`: the prefix trie over the tokenised pool, log mu per token (`probe_logprobs`) and
  alpha, the inputs of `rexrag_fast.ops.fused_policy_loss(probe_logprobs=..., alpha=...)`;
- `probes` (imported on its own, it pulls in the agent loop and the engine): `make_probes` forks dead-end
  trajectories at their answer with one prompt appended, `run_probes` continues them on the engine.

One training step: roll out n_agent trajectories per question -> exact-match rewards -> dead ends
(`select_dead_ends`, inside `probes.make_probes`) -> probes forked and run (`probes.run_probes`: history up
to the answer, answer span dropped, one prompt appended, continued for the remaining turns; same group id
as the source) -> old log-probs -> `prompt_mean_logprobs` + `select_trajectories` with
`keep_probe_count(keep_ratio.value, ...)` -> `policy_correction` -> loss ->
`keep_ratio.update(probe_accuracy(...))`.

Config keys (names as in the reference; default = its verl/trainer/config/ppo_trainer.yaml, script = its
scripts/search-r1-sgl/run_grpo_sglang_fsdp.sh):

    data.revision_prob                  default 0 (LLMGenerationManager's own default -1; validation runs
                                        pass 0), script 20. Percentage: a failed original is probed when
                                        u < revision_prob for u uniform on {0..100}, i.e. with chance
                                        ceil(revision_prob)/101.
    keep_ratio                          default 0.08, script 0.08. Initial value of the probe-budget EMA.
    actor_rollout_ref.rollout.n_agent   default 5, script 5. Trajectories per question (the GRPO group).
    actor_rollout_ref.rollout.n         default 1, script 1. Extra repeats after rollout (kept at 1).
    max_turns                           default 5, script 5. Search turns before the final, search-free
                                        answer turn; a probe continues for the turns its source had left.
    do_search                           default true, script true. Multi-turn retrieval loop on.
    data.train_batch_size               default 1024, script 512. Questions per step; the probe budget is
                                        int(train_batch_size * n_agent * keep_ratio).
    trainer.n_gpus_per_node             default 8, script 8. The probe budget is rounded down to a multiple
                                        of it (`multiple_of` here).
    data.max_prompt_length              default 512, script 4096.
    data.max_response_length            default 512, script 500 (tokens per turn).
    data.max_start_length               default 1024, script 2048.
    data.max_obs_length                 default 500, script 500.
    retriever.topk                      default 3, script 3.
    algorithm.adv_estimator             default gae, script grpo.
    actor_rollout_ref.actor.clip_ratio  default 0.2 (low 0.2, high 0.2, clip_ratio_c 3.0), script default.
    actor_rollout_ref.actor.loss_agg_mode       default token-mean, script default.
    actor_rollout_ref.actor.use_kl_loss         default false, script true; kl_loss_coef 0.001,
                                                kl_loss_type low_var_kl.
    actor_rollout_ref.actor.state_masking       default true, script true (retrieved tokens not trained;
                                                inserted prompt tokens are trained).
    actor_rollout_ref.actor.optim.lr            default 1e-6, script 1e-6.

Fixed in the reference code (constants here): EMA weight 0.1 (`filtering.KEEP_RATIO_EMA_WEIGHT`); a dead
end is an exact-match reward below 1; the prompt is drawn uniformly; mu of the first inserted token is 1;
err = 1 - accuracy of the originals (not clamped there; floored at `probe_distribution.MIN_ERROR_RATE`
here); alpha = kept probes / kept batch. Ours only: a user prompt pool file (`prompts.load_prompt_pool`).
"""

from rexrag_fast.rexrag.dead_ends import dead_end_probability, select_dead_ends
from rexrag_fast.rexrag.filtering import (
    KeepRatio,
    keep_probe_count,
    probe_accuracy,
    prompt_mean_logprobs,
    select_trajectories,
)
from rexrag_fast.rexrag.probe_distribution import (
    PolicyCorrection,
    PromptTrie,
    error_rate,
    explore_spans,
    original_accuracy,
    policy_correction,
    probe_logprobs,
    probe_share,
)
from rexrag_fast.rexrag.prompts import (
    DEFAULT_EXPLORE_PROMPTS,
    load_prompt_pool,
    resolve_prompt_pool,
    sample_prompt_indices,
    tokenize_prompts,
    validate_prompts,
)

__all__ = [
    "DEFAULT_EXPLORE_PROMPTS",
    "KeepRatio",
    "PolicyCorrection",
    "PromptTrie",
    "dead_end_probability",
    "error_rate",
    "explore_spans",
    "keep_probe_count",
    "load_prompt_pool",
    "original_accuracy",
    "policy_correction",
    "probe_accuracy",
    "probe_logprobs",
    "probe_share",
    "prompt_mean_logprobs",
    "resolve_prompt_pool",
    "sample_prompt_indices",
    "select_dead_ends",
    "select_trajectories",
    "tokenize_prompts",
    "validate_prompts",
]
