"""OPSM, mismatch telemetry, DAPO overlong handling and dynamic sampling."""

import pytest
import torch

from moerl.algos.corrections import (
    dynamic_sampling_keep,
    mismatch_metrics,
    off_policy_sequence_mask,
    overlong_filter,
    soft_overlong_punishment,
)

NAN, INF = float("nan"), float("inf")


def test_off_policy_sequence_mask_hand_example():
    # delta = 0.1; mean_t log(pi_rollout / pi_theta) per sequence:
    #   seq 0: A = -1, [0.3, 0.1] -> 0.2 > 0.1 and A < 0   -> dropped
    #   seq 1: A = +1, [0.3, 0.1] -> 0.2 > 0.1 but A > 0   -> kept (positives are never dropped)
    #   seq 2: A = -1, [0.05] * 3 -> 0.05 <= 0.1           -> kept
    #   seq 3: empty row (padding)                         -> kept, not counted
    # masked fraction 1/3; mean statistic (0.2 + 0.2 + 0.05) / 3 = 0.15.
    mask = torch.tensor([[1, 1, 0], [1, 1, 0], [1, 1, 1], [0, 0, 0]], dtype=torch.bool)
    logprobs = torch.tensor([[-1.3, -2.1, NAN], [-1.3, -2.1, INF], [-1.0] * 3, [NAN] * 3])
    logprobs.requires_grad_()
    rollout = torch.tensor([[-1.0, -2.0, -INF], [-1.0, -2.0, 0.0], [-0.95] * 3, [INF] * 3])
    adv = torch.tensor([[-1.0, -1.0, NAN], [1.0, 1.0, 0.0], [-1.0] * 3, [NAN] * 3])
    keep, m = off_policy_sequence_mask(logprobs, rollout, adv, mask, delta=0.1)
    assert keep.tolist() == [[False, False, True], [True] * 3, [True] * 3, [True] * 3]
    assert not keep.requires_grad
    assert m["opsm_masked_frac"].item() == pytest.approx(2 / 7)  # 2 of 7 counted tokens
    assert m["opsm_masked_seq_frac"].item() == pytest.approx(1 / 3)
    assert m["opsm_seq_kl"].item() == pytest.approx(0.15, abs=1e-6)
    # Dropping multiplies the loss, so the dropped row still counts in seq denominators.
    loss = torch.ones(4, 3) * keep * mask
    assert loss[0].sum() == 0 and loss[1].sum() == 2


def test_mismatch_metrics():
    # old - rollout = [0.1, -0.8, 0]: |.| mean 0.3, max 0.8; outside [1/2, 2] (|d| > ln 2): 1/3;
    # k3 = mean(e^d - 1 - d) = (0.005171 + 0.249329 + 0) / 3 = 0.084833.
    old = torch.tensor([[0.1, -0.8, 0.0, 100.0]])
    rollout = torch.tensor([[0.0, 0.0, 0.0, -100.0]])
    mask = torch.tensor([[1, 1, 1, 0]])
    m = mismatch_metrics(old, rollout, mask)
    assert m["mismatch_abs_mean"].item() == pytest.approx(0.3)
    assert m["mismatch_abs_max"].item() == pytest.approx(0.8)
    assert m["mismatch_extreme_frac"].item() == pytest.approx(1 / 3)
    assert m["mismatch_k3"].item() == pytest.approx(0.084833, abs=1e-6)


def test_overlong_filter_clears_truncated_rows():
    mask = torch.tensor([[1, 1, 0], [1, 1, 1], [1, 0, 0]])
    truncated = torch.tensor([False, True, False])
    out = overlong_filter(mask, truncated)
    assert out.tolist() == [[1, 1, 0], [0, 0, 0], [1, 0, 0]] and out.dtype == mask.dtype
    assert overlong_filter(mask.bool(), truncated).tolist() == out.bool().tolist()
    with pytest.raises(ValueError, match="truncated_B"):
        overlong_filter(mask, torch.tensor([True]))


def test_soft_overlong_punishment():
    # L_max = 20, L_cache = 4 -> no penalty up to 16; linear (16 - |y|) / 4 on (16, 20]; -1 after.
    lengths = torch.tensor([10, 16, 17, 18, 20, 21])
    out = soft_overlong_punishment(lengths, max_response_len=20, cache_len=4)
    torch.testing.assert_close(out, torch.tensor([0.0, 0.0, -0.25, -0.5, -1.0, -1.0]))
    with pytest.raises(ValueError, match="cache_len"):
        soft_overlong_punishment(lengths, max_response_len=20, cache_len=30)


def test_dynamic_sampling_keeps_groups_with_distinct_rewards():
    # Group 5: all 1 -> drop; group 2: [0, 1, 0] -> keep; group 9: three copies of 0.1 + 0.2
    # (exactly equal floats whose float mean is not) -> drop; group 4: a single sample -> drop.
    r = 0.1 + 0.2
    rewards = torch.tensor([1.0, 0.0, r, 1.0, 1.0, r, 0.0, r, 0.7], dtype=torch.float64)
    groups = torch.tensor([5, 2, 9, 5, 2, 9, 2, 9, 4])
    keep = dynamic_sampling_keep(rewards, groups)
    assert keep.tolist() == [False, True, False, False, True, False, True, False, False]
    with pytest.raises(ValueError, match="differ"):
        dynamic_sampling_keep(rewards[:3], groups)
