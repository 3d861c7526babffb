"""The rollout correction inside the objective: weights are computed once on the whole rollout
batch, so a self-normalised correction is the same whatever the micro-batch / data-parallel
split (its normaliser is global), and the split losses sum to the full-batch loss."""

import pytest
import torch

from moerl.batch import RolloutBatch
from moerl.config import load_config
from moerl.objective import Objective, compute_rollout_weights, policy_loss


def _batch(num_rows=6, width=5, seed=0):
    gen = torch.Generator().manual_seed(seed)
    lengths = torch.tensor([5, 2, 4, 1, 3, 5])[:num_rows]
    mask = torch.arange(width)[None, :] < lengths[:, None]
    rollout = -torch.rand(num_rows, width, generator=gen) * 2
    old = rollout + torch.randn(num_rows, width, generator=gen) * 0.3
    adv = torch.randn(num_rows, 1, generator=gen).expand(num_rows, width).clone()
    zeros = torch.zeros(num_rows, dtype=torch.long)
    return RolloutBatch(
        tokens_BT=torch.zeros(num_rows, width, dtype=torch.long),
        targets_BT=torch.zeros(num_rows, width, dtype=torch.long), response_mask_BT=mask,
        prompt_lengths_B=zeros + 1, response_lengths_B=lengths - 1,
        rollout_logprobs_BT=rollout, truncated_B=torch.zeros(num_rows, dtype=torch.bool),
        group_ids_B=torch.arange(num_rows) // 3, old_logprobs_BT=old, advantages_BT=adv)


@pytest.mark.parametrize("correction", ["tis", "seq_truncate", "geo_truncate", "icepop"])
def test_self_normalised_correction_is_split_invariant(correction):
    cfg = load_config(overrides=[f"algorithm.rollout_correction={correction}",
                                 "algorithm.rollout_correction_self_normalize=true",
                                 "algorithm.kl_coef=0", "algorithm.kl_estimator=none"])
    obj = Objective.from_config(cfg.algorithm, cfg.rollout)
    batch = _batch()
    metrics = compute_rollout_weights(batch, obj)
    assert metrics["rollout_correction/ess"] > 0
    logprobs = batch.old_logprobs_BT + 0.05  # pi_theta moved a little
    mask = batch.response_mask_BT
    tokens, seqs = mask.sum().float(), mask.any(-1).sum().float()
    full, _ = policy_loss(batch, logprobs, None, obj, global_num_tokens=tokens,
                          global_num_seqs=seqs)
    split = 0.0
    for rows in (torch.tensor([0, 3]), torch.tensor([1, 4, 5]), torch.tensor([2])):
        mb = batch.select(rows)
        part, _ = policy_loss(mb, logprobs[rows, :mb.seq_len], None, obj,
                              global_num_tokens=tokens, global_num_seqs=seqs)
        split = split + part
    torch.testing.assert_close(split, full)
    # Self-normalised: the weights average to 1 over the units of the whole batch.
    w = batch.rollout_is_weights_BT
    units = w[mask] if correction in ("tis", "icepop") else w[:, 0]
    assert units.mean().item() == pytest.approx(1.0, abs=1e-5)
