"""Regression tests for the independent review of ``moerl.algos`` (issue 10): each failed on the
code the review read. The logged-loss fix (item 3) is tested at DP=2 in ``test_logged_loss_dp``."""

import pytest
import torch

from moerl.algos.advantages import (
    dr_grpo_advantages,
    grpo_advantages,
    outcome_token_rewards,
    rloo_advantages,
)

GROUP_ESTIMATORS = {"grpo": grpo_advantages, "rloo": rloo_advantages, "dr_grpo": dr_grpo_advantages}


def _equal_groups(values, group_size, dtype):
    """One all-equal group per value, groups interleaved, responses of different lengths."""
    num = len(values)
    rewards_B = torch.tensor(values, dtype=torch.float64).repeat(group_size).to(dtype)
    group_ids_B = torch.arange(num).repeat(group_size)
    lengths_B = 1 + torch.arange(num * group_size) % 5
    mask_BT = torch.arange(5)[None, :] < lengths_B[:, None]
    return outcome_token_rewards(rewards_B, mask_BT), mask_BT, group_ids_B


@pytest.mark.parametrize("name", sorted(GROUP_ESTIMATORS))
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("group_size", [2, 3, 7, 16, 64])
def test_all_equal_group_gives_exactly_zero(name, dtype, group_size):
    gen = torch.Generator().manual_seed(group_size)
    values = [0.7, 0.1, 1 / 3, -2.3, 0.0, 1.0, 12.345, -7.77]
    values += (torch.rand(48, generator=gen, dtype=torch.float64) * 20 - 10).tolist()
    big = [1e4 + 0.1, -3.3e4 + 0.7] if dtype == torch.float16 else [1e6 + 0.1, 3.3e7 + 0.7,
                                                                     -1e30 / 3]
    token_rewards, mask, group_ids = _equal_groups(values + big, group_size, dtype)
    adv = GROUP_ESTIMATORS[name](token_rewards, mask, group_ids)
    assert torch.equal(adv, torch.zeros_like(adv)), adv[adv != 0][:8]


@pytest.mark.parametrize("name", sorted(GROUP_ESTIMATORS))
def test_group_of_sixteen_rewards_of_0_7(name):
    # The review's case: float32 mean of sixteen 0.7s is one rounding step off; GRPO's division
    # by (std + 1e-6) turned it into A = +0.106 on every sample.
    token_rewards, mask, group_ids = _equal_groups([0.7], 16, torch.float32)
    adv = GROUP_ESTIMATORS[name](token_rewards, mask, group_ids)
    assert adv.abs().max().item() == 0.0


@pytest.mark.parametrize("name", sorted(GROUP_ESTIMATORS))
def test_group_with_distinct_rewards_keeps_its_signal(name):
    # The exact-zero path must not swallow groups that differ (even by one ulp of a large value).
    rewards = torch.tensor([0.7, 0.7, 0.7, 0.7000001, 3e7, 3e7, 3e7, 3e7 + 2])
    mask = torch.ones(8, 2, dtype=torch.bool)
    group_ids = torch.tensor([0, 0, 0, 0, 1, 1, 1, 1])
    adv = GROUP_ESTIMATORS[name](outcome_token_rewards(rewards, mask), mask, group_ids)
    per_seq = adv[:, -1]
    assert (per_seq[[3, 7]] > 0).all() and (per_seq[[0, 1, 2, 4, 5, 6]] < 0).all()
    if name == "grpo":  # 3 equal + 1 higher by 2 (float32 ulp at 3e7): mean +0.5, sample std 1
        torch.testing.assert_close(per_seq[4:], torch.tensor([-0.5, -0.5, -0.5, 1.5]),
                                   atol=1e-5, rtol=0)


def test_opsm_uses_the_per_token_advantage_sign():
    # DeepSeek-V3.2 eq. 9: M_it = 0 iff A_it < 0 and the sequence's mean log(pi_rollout/pi_theta)
    # exceeds delta. Row 0 drifted (statistic 0.2 > 0.1) and its GAE advantages change sign:
    # mean advantage +0.33 > 0, but tokens 1 and 2 are negative and must be dropped; token 0
    # (positive) and the undrifted row 1 (statistic 0.0) are kept whatever their signs.
    from moerl.algos.corrections import off_policy_sequence_mask

    mask = torch.ones(2, 3, dtype=torch.bool)
    rollout = torch.tensor([[-1.0, -1.0, -1.0], [-1.0, -1.0, -1.0]])
    logprobs = torch.tensor([[-1.2, -1.2, -1.2], [-1.0, -1.0, -1.0]])
    adv = torch.tensor([[2.0, -0.5, -0.5], [-1.0, 1.0, -1.0]])
    keep, metrics = off_policy_sequence_mask(logprobs, rollout, adv, mask, delta=0.1)
    assert keep.shape == (2, 3)
    assert keep.tolist() == [[True, False, False], [True, True, True]]
    assert metrics["opsm_masked_frac"].item() == pytest.approx(2 / 6)


def _micro_batch(old_logprobs, rollout_logprobs, advantages):
    """A one-row RolloutBatch whose response is every column (what the loss sees)."""
    from moerl.batch import RolloutBatch

    b, t = old_logprobs.shape
    return RolloutBatch(
        tokens_BT=torch.zeros(b, t, dtype=torch.long),
        targets_BT=torch.zeros(b, t, dtype=torch.long),
        response_mask_BT=torch.ones(b, t, dtype=torch.bool),
        prompt_lengths_B=torch.ones(b, dtype=torch.long),
        response_lengths_B=torch.full((b,), t - 1, dtype=torch.long),
        rollout_logprobs_BT=rollout_logprobs, truncated_B=torch.zeros(b, dtype=torch.bool),
        group_ids_B=torch.arange(b), old_logprobs_BT=old_logprobs, advantages_BT=advantages)


def _token_weights(cfg, old, rollout, adv, logprobs):
    """d loss / d logprobs for a token_mean loss over the row: -weight * A / num_tokens."""
    from moerl.objective import Objective, compute_rollout_weights, policy_loss

    obj = Objective.from_config(cfg.algorithm, cfg.rollout)
    mb = _micro_batch(old, rollout, adv)
    compute_rollout_weights(mb, obj)
    logprobs = logprobs.clone().requires_grad_(True)
    loss, metrics = policy_loss(mb, logprobs, None, obj, global_num_tokens=torch.tensor(4.0),
                                global_num_seqs=torch.tensor(1.0))
    loss.backward()
    return -(logprobs.grad * 4 / adv), metrics


def test_cispo_preset_has_no_lower_bound():
    # MiniMax-M1 eq. 4: only the upper side of the IS weight is truncated. Ratios 0.5 and 0.01
    # keep their weights (the old preset clipped them to 0.8); ratio 8 is cut at 1 + 5 = 6.
    from moerl.config import load_config

    cfg = load_config(["configs/cispo.yaml"])
    assert cfg.algorithm.clip_eps_low is None
    old = torch.zeros(1, 4)
    logprobs = torch.log(torch.tensor([[0.5, 0.01, 1.0, 8.0]]))
    w, _ = _token_weights(cfg, old, torch.zeros(1, 4), torch.ones(1, 4), logprobs)
    torch.testing.assert_close(w, torch.tensor([[0.5, 0.01, 1.0, 6.0]]))


def test_no_lower_bound_is_refused_where_the_loss_needs_one():
    from moerl.config import ConfigError, load_config

    with pytest.raises(ConfigError, match="clip_eps_low"):
        load_config(["configs/grpo.yaml"], ["algorithm.clip_eps_low=null"])


def test_icepop_default_bounds_are_the_papers():
    # IcePop (Ling team, Ring-1T, arXiv:2510.18855): M(k) = k on [0.5, 5], else 0. A token with
    # pi_old / pi_rollout = 3 keeps weight 3 (the old config default high = 2 dropped it);
    # ratios 6 and 0.4 are masked.
    from moerl.config import load_config

    cfg = load_config(overrides=["algorithm.rollout_correction=icepop",
                                 "algorithm.aggregation=token_mean"])
    ratios = torch.tensor([[3.0, 6.0, 0.4, 1.0]])
    w, _ = _token_weights(cfg, ratios.log(), torch.zeros(1, 4), torch.ones(1, 4),
                          ratios.log())
    torch.testing.assert_close(w, torch.tensor([[3.0, 0.0, 0.0, 1.0]]))


def test_every_algorithm_field_is_read():
    # algorithm.value_coef was documented and never read (the critic has its own optimizer).
    import dataclasses
    import pathlib
    import re

    from moerl.config import AlgorithmConfig, ConfigError, load_config
    from moerl.objective import Objective

    root = pathlib.Path(__file__).resolve().parents[1]
    sources = "\n".join(p.read_text() for p in [*root.glob("moerl/**/*.py"),
                                                 *root.glob("tools/*.py")]
                        if p.name != "config.py")
    via_objective = {f.name for f in dataclasses.fields(Objective)}
    unread = [f.name for f in dataclasses.fields(AlgorithmConfig)
              if f.name not in via_objective and not re.search(rf"\.{f.name}\b", sources)]
    assert unread == []
    with pytest.raises(ConfigError, match="value_coef"):
        load_config(overrides=["algorithm.value_coef=0.5"])
