"""rexrag_fast.ops"""

from rexrag_fast.ops.causal_lm import causal_lm_logprobs as causal_lm_logprobs
from rexrag_fast.ops.core_algos import agg_loss as agg_loss
from rexrag_fast.ops.core_algos import compute_grpo_outcome_advantage as compute_grpo_outcome_advantage
from rexrag_fast.ops.core_algos import compute_policy_loss as compute_policy_loss
from rexrag_fast.ops.core_algos import kl_penalty as kl_penalty
from rexrag_fast.ops.linear_logprobs import linear_logprobs as linear_logprobs
from rexrag_fast.ops.policy_loss import fused_policy_loss as fused_policy_loss
