"""moerl's RL algorithm library: pure tensor functions, no Megatron or SGLang imports.

An algorithm (GRPO, DAPO, GSPO, Dr.GRPO, PPO, CISPO, DeepSeek-V3.2's Scaling GRPO) is a preset
that picks one entry from each registry plus the corrections it uses; see each module's
docstring for the conventions (std, eps, clamps, what pi_old means). The registries
(``ADVANTAGE_ESTIMATORS``, ``POLICY_LOSSES``, ``KL_ESTIMATORS``, ``AGGREGATIONS``,
``ROLLOUT_CORRECTIONS``) are the one source of the names a config can choose; each registry has
one call signature, documented where it is defined.
"""

from moerl.algos.advantages import (
    ADVANTAGE_ESTIMATORS,
    CRITIC_ESTIMATORS,
    gae,
    outcome_token_rewards,
)
from moerl.algos.aggregation import AGGREGATIONS, local_denominators
from moerl.algos.corrections import (
    dynamic_sampling_keep,
    mismatch_metrics,
    off_policy_sequence_mask,
    overlong_filter,
    soft_overlong_punishment,
)
from moerl.algos.dpo import dpo_loss, sequence_logprobs
from moerl.algos.kl import KL_ESTIMATORS, kl_penalized_rewards
from moerl.algos.policy_losses import POLICY_LOSSES
from moerl.algos.rollout_correction import ROLLOUT_CORRECTIONS, importance_weights
from moerl.algos.value import clipped_value_loss, entropy_bonus_loss, ptx_loss

__all__ = [
    "ADVANTAGE_ESTIMATORS",
    "AGGREGATIONS",
    "CRITIC_ESTIMATORS",
    "KL_ESTIMATORS",
    "POLICY_LOSSES",
    "ROLLOUT_CORRECTIONS",
    "clipped_value_loss",
    "dpo_loss",
    "dynamic_sampling_keep",
    "entropy_bonus_loss",
    "gae",
    "importance_weights",
    "kl_penalized_rewards",
    "local_denominators",
    "mismatch_metrics",
    "off_policy_sequence_mask",
    "outcome_token_rewards",
    "overlong_filter",
    "ptx_loss",
    "sequence_logprobs",
    "soft_overlong_punishment",
]
