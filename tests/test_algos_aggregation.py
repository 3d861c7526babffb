"""Loss aggregation: per-token weights of each mode and invariance to micro-batch splits."""

import pytest
import torch

from moerl.algos.advantages import dr_grpo_advantages, outcome_token_rewards
from moerl.algos.aggregation import AGGREGATIONS, local_denominators


def _mask(lengths, width):
    return torch.arange(width)[None, :] < torch.tensor(lengths)[:, None]


def _token_weights(mode, mask, **kw):
    """d(aggregate)/d(loss_t): the weight each token gets under ``mode``."""
    loss = torch.ones(mask.shape, requires_grad=True)
    AGGREGATIONS[mode](loss, mask, **kw).backward()
    return loss.grad


def test_token_mean_vs_seq_mean_weights_200_and_10_tokens():
    mask = _mask([200, 10], 200)
    # token_mean: 210 tokens, each weighs 1/210.
    w = _token_weights("token_mean", mask)
    torch.testing.assert_close(w[mask], torch.full((210,), 1 / 210))
    # seq_mean_token_mean: each sequence weighs 1/2, split over its tokens:
    # 1/(2*200) = 1/400 for the long one, 1/(2*10) = 1/20 for the short one.
    w = _token_weights("seq_mean_token_mean", mask)
    torch.testing.assert_close(w[0, :200], torch.full((200,), 1 / 400))
    torch.testing.assert_close(w[1, :10], torch.full((10,), 1 / 20))
    # Dr.GRPO's constant divisor (L_max = 200): every token 1/(2*200), whatever its length.
    w = _token_weights("seq_mean_token_sum_norm", mask, max_response_len=200)
    torch.testing.assert_close(w[mask], torch.full((210,), 1 / 400))
    for mode in AGGREGATIONS:
        assert (_token_weights(mode, mask, max_response_len=200)[~mask] == 0).all()


def test_dilution_example_under_each_mode():
    # 2, 6, 6 tokens with Dr.GRPO advantages [2/3, 2/3, -4/3]. Aggregating the advantages
    # themselves shows how much each response pushes:
    #   seq_mean_token_mean: (2/3 + 2/3 - 4/3) / 3 = 0 (each response counts once);
    #   token_mean: (2 * 2/3 + 6 * 2/3 - 6 * 4/3) / 14 = (4/3 + 4 - 8) / 14 = -4/21: the long
    #   negative response outweighs the short positive one, whose share is 2 * (2/3) / 14 = 2/21.
    mask = _mask([2, 6, 6], 6)
    rewards = torch.tensor([1.0, 1.0, -1.0])
    adv = dr_grpo_advantages(outcome_token_rewards(rewards, mask), mask, torch.zeros(3, dtype=int))
    assert AGGREGATIONS["seq_mean_token_mean"](adv, mask).item() == pytest.approx(0.0, abs=1e-7)
    assert AGGREGATIONS["token_mean"](adv, mask).item() == pytest.approx(-4 / 21)
    share = AGGREGATIONS["token_mean"](adv * torch.tensor([[1.0], [0], [0]]), mask)
    assert share.item() == pytest.approx(2 / 21)


@pytest.mark.parametrize("mode", sorted(AGGREGATIONS))
def test_sum_over_uneven_micro_batches_equals_full_batch(mode):
    torch.manual_seed(0)
    lengths = [5, 1, 7, 0, 3, 8, 2]  # one padding row
    mask = _mask(lengths, 8)
    loss = torch.randn(7, 8).masked_fill(~mask, float("nan"))
    kw = {"max_response_len": 8}
    full = AGGREGATIONS[mode](loss, mask, **kw)
    # Three uneven micro-batches, each trimmed to its own padded width, as a packer would.
    splits = [(0, 2), (2, 6), (6, 7)]
    micro = []
    for lo, hi in splits:
        width = max(max(lengths[lo:hi]), 1)
        micro.append((loss[lo:hi, :width], mask[lo:hi, :width]))
    counts = [local_denominators(m) for _, m in micro]
    num_tokens = sum(c[0] for c in counts)
    num_seqs = sum(c[1] for c in counts)
    assert num_tokens.item() == sum(lengths) and num_seqs.item() == 6
    total = sum(
        AGGREGATIONS[mode](l, m, global_num_tokens=num_tokens, global_num_seqs=num_seqs, **kw)
        for l, m in micro
    )
    torch.testing.assert_close(total, full)
    # Without global denominators the per-micro-batch means do not add up to the full loss.
    local = sum(AGGREGATIONS[mode](l, m, **kw) for l, m in micro) / len(micro)
    assert not torch.allclose(local, full)


@pytest.mark.parametrize("mode", sorted(AGGREGATIONS))
def test_all_padding_micro_batch_is_zero(mode):
    mask = torch.zeros(2, 3, dtype=torch.bool)
    loss = torch.full((2, 3), float("nan"), requires_grad=True)
    out = AGGREGATIONS[mode](loss, mask, max_response_len=3)
    assert out.item() == 0.0
    out.backward()
    assert (loss.grad == 0).all()


def test_dr_grpo_mode_requires_budget():
    mask = _mask([2], 2)
    with pytest.raises(ValueError, match="max_response_len"):
        AGGREGATIONS["seq_mean_token_sum_norm"](torch.ones(1, 2), mask)
    with pytest.raises(ValueError, match="shape"):
        AGGREGATIONS["token_mean"](torch.ones(1, 3), mask)
    with pytest.raises(ValueError, match="positive"):
        AGGREGATIONS["token_mean"](torch.ones(1, 2), mask, global_num_tokens=0)
