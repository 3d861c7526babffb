"""Advantage estimators against hand-computed values; GAE recursion vs closed form."""

import pytest
import torch

from moerl.algos.advantages import (
    ADVANTAGE_ESTIMATORS,
    dr_grpo_advantages,
    gae,
    grpo_advantages,
    outcome_token_rewards,
    reinforce_pp_advantages,
    reinforce_pp_baseline_advantages,
    rloo_advantages,
)


def _mask(lengths, width):
    return torch.arange(width)[None, :] < torch.tensor(lengths)[:, None]


def _per_sequence(adv_BT, mask):
    """The advantage of each row, checking it is constant over the row's counted tokens."""
    out = []
    for row, m in zip(adv_BT, mask):
        vals = row[m]
        assert torch.allclose(vals, vals[0].expand_as(vals))
        assert (row[~m] == 0).all()
        out.append(vals[0].item())
    return out


def test_outcome_token_rewards_sit_on_last_counted_token():
    mask = torch.tensor([[1, 1, 0, 0], [1, 1, 1, 1], [0, 0, 0, 0], [0, 1, 1, 0]], dtype=torch.bool)
    rewards = torch.tensor([1.0, -1.0, 5.0, 0.5])
    expected = torch.tensor(
        [[0, 1.0, 0, 0], [0, 0, 0, -1.0], [0, 0, 0, 0], [0, 0, 0.5, 0]]  # empty row: no reward
    )
    torch.testing.assert_close(outcome_token_rewards(rewards, mask), expected)
    # Integer rewards become floats.
    assert outcome_token_rewards(torch.tensor([1, 0, 1, 1]), mask).is_floating_point()


def test_grpo_sample_std_hand_example():
    # Group 7 rewards [1, 0, 0, 1]: mean 0.5, sample std sqrt(4 * 0.25 / 3) = 0.57735, so
    # A = +-0.5 / 0.57735 = +-0.866025 (a population std would give +-1).
    # Group 3 rewards [1, 1, 1, 0]: mean 0.75, squared deviations 3 * 0.0625 + 0.5625 = 0.75,
    # sample variance 0.25, std 0.5: A = [0.5, 0.5, 0.5, -1.5].
    # Groups are interleaved to check the ids, not the order, define them.
    group_ids = torch.tensor([7, 3, 7, 3, 7, 3, 7, 3])
    rewards = torch.tensor([1.0, 1.0, 0.0, 1.0, 0.0, 1.0, 1.0, 0.0])
    lengths = [3, 1, 4, 2, 2, 4, 1, 3]
    mask = _mask(lengths, 4)
    adv = grpo_advantages(outcome_token_rewards(rewards, mask), mask, group_ids)
    a = 0.5 / (1 / 3) ** 0.5
    expected = [a, 0.5, -a, 0.5, -a, 0.5, a, -1.5]
    assert _per_sequence(adv, mask) == pytest.approx(expected, abs=1e-5)


def test_grpo_group_of_one_and_all_equal_group_get_zero():
    group_ids = torch.tensor([0, 1, 1, 1])
    rewards = torch.tensor([1.0, 0.3, 0.3, 0.3])
    mask = _mask([2, 2, 2, 2], 2)
    adv = grpo_advantages(outcome_token_rewards(rewards, mask), mask, group_ids)
    assert torch.isfinite(adv).all()
    assert _per_sequence(adv, mask) == pytest.approx([0.0, 0.0, 0.0, 0.0], abs=1e-4)


def test_dr_grpo_dilution_example():
    # Three responses of 2, 6, 6 tokens with rewards +1, +1, -1: the mean baseline is 1/3, so
    # A = [2/3, 2/3, -4/3] and no std division.
    mask = _mask([2, 6, 6], 6)
    rewards = torch.tensor([1.0, 1.0, -1.0])
    adv = dr_grpo_advantages(outcome_token_rewards(rewards, mask), mask, torch.zeros(3, dtype=int))
    assert _per_sequence(adv, mask) == pytest.approx([2 / 3, 2 / 3, -4 / 3], abs=1e-6)


def test_rloo_leave_one_out():
    # Rewards [1, 0, 0, 1]: A_0 = 1 - mean(0, 0, 1) = 2/3, A_1 = 0 - mean(1, 0, 1) = -2/3.
    mask = _mask([1, 2, 3, 1], 3)
    rewards = torch.tensor([1.0, 0.0, 0.0, 1.0])
    adv = rloo_advantages(outcome_token_rewards(rewards, mask), mask, torch.zeros(4, dtype=int))
    assert _per_sequence(adv, mask) == pytest.approx([2 / 3, -2 / 3, -2 / 3, 2 / 3], abs=1e-6)


def test_group_estimators_sum_token_rewards():
    # A KL penalty spread over tokens counts in the sequence return R_i = sum_t r_t:
    # R = [1 - 0.2, 0 - 0.1] = [0.8, -0.1]; Dr.GRPO: mean 0.35 -> [0.45, -0.45].
    mask = _mask([2, 2], 2)
    token_rewards = torch.tensor([[-0.2, 1.0], [-0.1, 0.0]])
    adv = dr_grpo_advantages(token_rewards, mask, torch.tensor([0, 0]))
    assert _per_sequence(adv, mask) == pytest.approx([0.45, -0.45], abs=1e-6)


def test_reinforce_pp_batch_normalisation():
    # Undiscounted returns-to-go: seq 0 rewards [-0.1, 1.0] -> G = [0.9, 1.0]; seq 1 rewards
    # [0, -0.2, 0] -> G = [-0.2, -0.2, 0]. Over the 5 tokens: mean 0.3, squared deviations
    # 0.36 + 0.49 + 0.25 + 0.25 + 0.09 = 1.44, sample variance 0.36, std 0.6:
    # A = [1, 7/6, -5/6, -5/6, -1/2].
    mask = _mask([2, 3], 4)
    token_rewards = torch.tensor([[-0.1, 1.0, 9.0, 9.0], [0.0, -0.2, 0.0, 9.0]])  # 9 = padding
    adv = reinforce_pp_advantages(token_rewards, mask, None)
    expected = torch.tensor([[1.0, 7 / 6, 0, 0], [-5 / 6, -5 / 6, -0.5, 0]])
    torch.testing.assert_close(adv, expected, atol=1e-5, rtol=0)


def test_reinforce_pp_baseline():
    # One-token responses, groups {0, 1} and {2, 3}, rewards [1, 0, 1, 1]: group-centred
    # [0.5, -0.5, 0, 0]; batch mean 0, sample variance 0.5 / 3, std 0.408248:
    # A = [1.224745, -1.224745, 0, 0].
    mask = _mask([1, 1, 1, 1], 1)
    adv = reinforce_pp_baseline_advantages(
        torch.tensor([[1.0], [0.0], [1.0], [1.0]]), mask, torch.tensor([0, 0, 1, 1])
    )
    torch.testing.assert_close(
        adv[:, 0], torch.tensor([1.224745, -1.224745, 0.0, 0.0]), atol=1e-5, rtol=0
    )


def test_gae_hand_example():
    # rewards [0, 0, 1], values [0.5, 0.6, 0.7], gamma 0.9, lam 0.8, terminal after the last:
    # delta_2 = 1 - 0.7 = 0.3; delta_1 = 0.9 * 0.7 - 0.6 = 0.03; delta_0 = 0.9 * 0.6 - 0.5 = 0.04
    # A_2 = 0.3; A_1 = 0.03 + 0.72 * 0.3 = 0.246; A_0 = 0.04 + 0.72 * 0.246 = 0.21712
    # returns = A + V = [0.71712, 0.846, 1.0]. Padding column holds garbage.
    rewards = torch.tensor([[0.0, 0.0, 1.0, float("nan")]])
    values = torch.tensor([[0.5, 0.6, 0.7, float("inf")]])
    mask = _mask([3], 4)
    adv, ret = gae(rewards, values, mask, gamma=0.9, lam=0.8)
    torch.testing.assert_close(adv, torch.tensor([[0.21712, 0.246, 0.3, 0.0]]))
    torch.testing.assert_close(ret, torch.tensor([[0.71712, 0.846, 1.0, 0.0]]))
    # lam = 0: A = delta = [0.04, 0.03, 0.3] (one-step TD).
    adv0, _ = gae(rewards, values, mask, gamma=0.9, lam=0.0)
    torch.testing.assert_close(adv0, torch.tensor([[0.04, 0.03, 0.3, 0.0]]))
    # lam = 1: A = discounted return - V, G = [0.81, 0.9, 1.0] -> A = [0.31, 0.3, 0.3]; returns = G.
    adv1, ret1 = gae(rewards, values, mask, gamma=0.9, lam=1.0)
    torch.testing.assert_close(adv1, torch.tensor([[0.31, 0.3, 0.3, 0.0]]))
    torch.testing.assert_close(ret1, torch.tensor([[0.81, 0.9, 1.0, 0.0]]))


def _random_rl_batch(seed=0):
    torch.manual_seed(seed)
    mask = torch.rand(5, 9) > 0.25  # holes anywhere, e.g. tool observations mid-response
    mask[0] = False  # an empty row
    mask[1, :] = True  # a full row
    rewards = torch.randn(5, 9).masked_fill(~mask, float("nan"))
    values = torch.randn(5, 9).masked_fill(~mask, float("-inf"))
    return rewards, values, mask


def _gae_closed_form(rewards, values, mask, gamma, lam):
    """Per row, over the counted tokens only: A_t = sum_k (gamma lam)^k delta_{t+k}."""
    adv = torch.zeros_like(rewards, dtype=torch.float64)
    for b in range(rewards.shape[0]):
        idx = torch.nonzero(mask[b]).squeeze(-1).tolist()
        r = [float(rewards[b, i]) for i in idx]
        v = [float(values[b, i]) for i in idx] + [0.0]
        deltas = [r[k] + gamma * v[k + 1] - v[k] for k in range(len(idx))]
        for k, i in enumerate(idx):
            adv[b, i] = sum((gamma * lam) ** j * deltas[k + j] for j in range(len(idx) - k))
    return adv


def _gae_recursive(rewards, values, mask, gamma, lam):
    """Per row, the textbook recursion A_t = delta_t + gamma lam A_{t+1} on the counted tokens."""
    adv = torch.zeros_like(rewards, dtype=torch.float64)
    for b in range(rewards.shape[0]):
        next_value, next_adv = 0.0, 0.0
        for i in reversed(torch.nonzero(mask[b]).squeeze(-1).tolist()):
            delta = float(rewards[b, i]) + gamma * next_value - float(values[b, i])
            next_adv = delta + gamma * lam * next_adv
            next_value = float(values[b, i])
            adv[b, i] = next_adv
    return adv


@pytest.mark.parametrize("gamma,lam", [(0.99, 0.95), (1.0, 1.0), (0.9, 0.0), (1.0, 0.95)])
def test_gae_recursive_equals_closed_form(gamma, lam):
    rewards, values, mask = _random_rl_batch()
    adv, ret = gae(rewards, values, mask, gamma=gamma, lam=lam)
    recursive = _gae_recursive(rewards, values, mask, gamma, lam)
    closed = _gae_closed_form(rewards, values, mask, gamma, lam)
    torch.testing.assert_close(recursive, closed)
    torch.testing.assert_close(adv.double(), recursive, atol=1e-5, rtol=1e-5)
    expected_ret = torch.where(mask, adv + values.masked_fill(~mask, 0.0), 0.0)
    torch.testing.assert_close(ret, expected_ret)
    assert torch.isfinite(adv).all() and torch.isfinite(ret).all()


def test_gae_lambda_one_is_discounted_return_minus_value():
    rewards, values, mask = _random_rl_batch(seed=3)
    gamma = 0.9
    _, ret = gae(rewards, values, mask, gamma=gamma, lam=1.0)
    # returns(lam = 1) = discounted sum of the counted rewards, independent of the values.
    _, ret_other_values = gae(rewards, torch.randn_like(values), mask, gamma=gamma, lam=1.0)
    torch.testing.assert_close(ret, ret_other_values)
    closed = _gae_closed_form(rewards, torch.zeros_like(values), mask, gamma, 1.0)
    torch.testing.assert_close(ret.double(), closed, atol=1e-5, rtol=1e-5)


def test_gae_lambda_zero_is_one_step_td():
    rewards, values, mask = _random_rl_batch(seed=4)
    adv, _ = gae(rewards, values, mask, gamma=0.8, lam=0.0)
    b, i = 1, 3  # row 1 is full: the next counted column is i + 1
    expected = rewards[b, i] + 0.8 * values[b, i + 1] - values[b, i]
    assert adv[b, i].item() == pytest.approx(expected.item(), abs=1e-6)


@pytest.mark.parametrize("name", sorted(ADVANTAGE_ESTIMATORS))
def test_registry_entries_shape_mask_and_garbage(name):
    torch.manual_seed(5)
    mask = _mask([3, 1, 4, 0, 2, 4], 4)
    group_ids = torch.tensor([0, 0, 0, 1, 1, 1])
    clean = outcome_token_rewards(torch.randn(6), mask) + 0.01 * torch.randn(6, 4)
    clean = clean.masked_fill(~mask, 0.0)
    garbage = clean.masked_fill(~mask, float("nan"))
    values = torch.randn(6, 4)
    out_clean, returns = ADVANTAGE_ESTIMATORS[name](clean, mask, group_ids, values,
                                                    gamma=0.9, lam=0.95)
    out_garbage, _ = ADVANTAGE_ESTIMATORS[name](garbage, mask.float(), group_ids,
                                                values.masked_fill(~mask, float("inf")),
                                                gamma=0.9, lam=0.95)
    assert (returns is not None) == (name == "gae")
    assert out_clean.shape == mask.shape
    assert torch.isfinite(out_garbage).all()
    assert (out_garbage[~mask] == 0).all()
    torch.testing.assert_close(out_garbage, out_clean)
    assert not out_clean.requires_grad


def test_bad_inputs_raise():
    mask = _mask([2, 2], 2)
    with pytest.raises(ValueError, match="group_ids_B"):
        grpo_advantages(torch.zeros(2, 2), mask, torch.tensor([0, 0, 0]))
    with pytest.raises(ValueError, match="integer"):
        grpo_advantages(torch.zeros(2, 2), mask, torch.tensor([0.0, 1.0]))
    with pytest.raises(ValueError, match="gamma"):
        gae(torch.zeros(2, 2), torch.zeros(2, 2), mask, gamma=1.5, lam=0.9)
