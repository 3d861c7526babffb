"""Rollout corrections (importance weights pi_old / pi_rollout) against hand-computed values from
their definitions: token / sequence / geometric level, truncate / mask / reject, bounds,
self-normalisation and the metrics."""

import math

import pytest
import torch

from moerl.algos.rollout_correction import ROLLOUT_CORRECTIONS, importance_weights

NAN, INF = float("nan"), float("inf")


def _token_batch():
    # Ratios pi_old / pi_rollout: row 0 [3, 0.4, 1], row 1 [1.5, 0.25] + a padding column,
    # row 2 empty. Padding holds garbage.
    ratios = torch.tensor([[3.0, 0.4, 1.0], [1.5, 0.25, 1.0], [1.0, 1.0, 1.0]])
    mask = torch.tensor([[1, 1, 1], [1, 1, 0], [0, 0, 0]], dtype=torch.bool)
    old = ratios.log().masked_fill(~mask, NAN)
    rollout = torch.zeros(3, 3).masked_fill(~mask, INF)
    return old, rollout, mask


def _seq_batch():
    # Row 0 [2, 2]: product 4, geometric mean 2. Row 1 [0.5, 1, 0.8]: product 0.4, geometric
    # 0.4^(1/3). Row 2 [1]: 1. Row 3 empty.
    ratios = torch.tensor([[2.0, 2.0, 1.0], [0.5, 1.0, 0.8], [1.0, 1.0, 1.0], [1.0, 1.0, 1.0]])
    mask = torch.tensor([[1, 1, 0], [1, 1, 1], [1, 0, 0], [0, 0, 0]], dtype=torch.bool)
    return ratios.log().masked_fill(~mask, -INF), torch.zeros(4, 3), mask


def _check(metrics, **expected):
    for key, value in expected.items():
        assert metrics[key].item() == pytest.approx(value, abs=1e-5), key


def test_tis_token_truncation():
    w, m = ROLLOUT_CORRECTIONS["tis"](*_token_batch())
    torch.testing.assert_close(w, torch.tensor([[2.0, 0.4, 1.0], [1.5, 0.25, 0.0], [0.0] * 3]))
    sq = 4 + 0.16 + 1 + 2.25 + 0.0625
    _check(m, weight_mean=5.15 / 5, truncated_frac=1 / 5, masked_frac=0.0, rejected_frac=0.0,
           ess=5.15**2 / (5 * sq))


def test_two_sided_truncation():
    # [0.5, 2]: 0.4 -> 0.5 and 0.25 -> 0.5 too.
    w, m = ROLLOUT_CORRECTIONS["token_truncate"](*_token_batch(), low=0.5, high=2.0)
    torch.testing.assert_close(w, torch.tensor([[2.0, 0.5, 1.0], [1.5, 0.5, 0.0], [0.0] * 3]))
    _check(m, truncated_frac=3 / 5, weight_mean=5.5 / 5)


def test_icepop_token_mask():
    w, m = ROLLOUT_CORRECTIONS["icepop"](*_token_batch())  # [0.5, 5]
    torch.testing.assert_close(w, torch.tensor([[3.0, 0.0, 1.0], [1.5, 0.0, 0.0], [0.0] * 3]))
    _check(m, weight_mean=5.5 / 5, truncated_frac=0.0, masked_frac=2 / 5, rejected_frac=0.0,
           ess=5.5**2 / (5 * (9 + 1 + 2.25)))


def test_token_mis_masks_above_c():
    w, m = ROLLOUT_CORRECTIONS["token_mask"](*_token_batch())  # [0, 2]: only the 3 goes
    torch.testing.assert_close(w, torch.tensor([[0.0, 0.4, 1.0], [1.5, 0.25, 0.0], [0.0] * 3]))
    _check(m, masked_frac=1 / 5)


def test_token_reject_drops_the_whole_sequence():
    # [0.3, 4]: row 0 is inside everywhere; row 1's 0.25 rejects all of row 1.
    w, m = ROLLOUT_CORRECTIONS["token_reject"](*_token_batch(), low=0.3, high=4.0)
    torch.testing.assert_close(w, torch.tensor([[3.0, 0.4, 1.0], [0.0] * 3, [0.0] * 3]))
    _check(m, masked_frac=2 / 5, rejected_frac=1 / 2, weight_mean=4.4 / 5,
           ess=4.4**2 / (5 * (9 + 0.16 + 1)))
    # Default bounds [0.5, 2]: both rows have an extreme token.
    w, m = ROLLOUT_CORRECTIONS["token_reject"](*_token_batch())
    assert w.abs().sum() == 0 and m["rejected_frac"].item() == 1.0 and m["ess"].item() == 0.0


def test_sequence_truncation_uses_the_product():
    w, m = ROLLOUT_CORRECTIONS["seq_truncate"](*_seq_batch())  # [0, 2]
    torch.testing.assert_close(w, torch.tensor([[2.0, 2.0, 0.0], [0.4] * 3, [1.0, 0, 0],
                                                [0.0] * 3]))
    _check(m, truncated_frac=1 / 3, weight_mean=6.2 / 6, masked_frac=0.0,
           ess=3.4**2 / (3 * (4 + 0.16 + 1)))  # ESS over the 3 sequences


@pytest.mark.parametrize("name", ["seq_mask", "seq_reject"])
def test_sequence_mis(name):
    # MIS: a sequence whose product exceeds C = 2 is dropped, the others keep their weight.
    w, m = ROLLOUT_CORRECTIONS[name](*_seq_batch())
    torch.testing.assert_close(w, torch.tensor([[0.0] * 3, [0.4] * 3, [1.0, 0, 0], [0.0] * 3]))
    _check(m, masked_frac=2 / 6, rejected_frac=1 / 3, truncated_frac=0.0,
           ess=1.4**2 / (3 * (0.16 + 1)))


def test_geometric_level():
    g = 0.4 ** (1 / 3)
    w, m = ROLLOUT_CORRECTIONS["geo_truncate"](*_seq_batch(), low=0.5, high=1.5)
    torch.testing.assert_close(w, torch.tensor([[1.5, 1.5, 0.0], [g] * 3, [1.0, 0, 0],
                                                [0.0] * 3]))
    _check(m, truncated_frac=1 / 3)
    for name in ("geo_mask", "geo_reject"):  # [0.999, 1.001]: only row 2 is that close
        w, m = ROLLOUT_CORRECTIONS[name](*_seq_batch())
        torch.testing.assert_close(w, torch.tensor([[0.0] * 3, [0.0] * 3, [1.0, 0, 0],
                                                    [0.0] * 3]))
        _check(m, masked_frac=5 / 6, rejected_frac=2 / 3)
    w, _ = ROLLOUT_CORRECTIONS["geo_mask"](*_seq_batch(), low=0.7, high=1.5)
    torch.testing.assert_close(w[1], torch.tensor([g] * 3))
    assert w[0].sum() == 0


def test_self_normalised_weights_average_to_one_over_units():
    w, m = ROLLOUT_CORRECTIONS["seq_truncate"](*_seq_batch(), self_normalize=True)
    mean = (2 + 0.4 + 1) / 3
    torch.testing.assert_close(w[:3, 0], torch.tensor([2 / mean, 0.4 / mean, 1 / mean]))
    assert w[:3, 0].mean().item() == pytest.approx(1.0)
    w, m = ROLLOUT_CORRECTIONS["tis"](*_token_batch(), self_normalize=True)
    assert m["weight_mean"].item() == pytest.approx(1.0)
    torch.testing.assert_close(w[0], torch.tensor([2.0, 0.4, 1.0]) / 1.03)
    # Everything rejected: nothing to normalise, weights stay 0 (no 0/0).
    w, _ = ROLLOUT_CORRECTIONS["token_reject"](*_token_batch(), self_normalize=True)
    assert torch.equal(w, torch.zeros(3, 3))


def test_sequence_product_never_overflows():
    old = torch.tensor([[1e4, 1e4], [-1e4, 0.0]])
    mask = torch.ones(2, 2, dtype=torch.bool)
    w, _ = ROLLOUT_CORRECTIONS["seq_truncate"](old, torch.zeros(2, 2), mask, low=0.5)
    torch.testing.assert_close(w, torch.tensor([[2.0, 2.0], [0.5, 0.5]]))
    w, m = ROLLOUT_CORRECTIONS["seq_mask"](old, torch.zeros(2, 2), mask)
    assert torch.isfinite(w).all() and w[0].sum() == 0 and w[1].sum() == 0  # e^-1e4 underflows


@pytest.mark.parametrize("name", sorted(ROLLOUT_CORRECTIONS))
def test_every_entry_one_signature_and_garbage_free(name):
    old, rollout, mask = _token_batch()
    w, metrics = ROLLOUT_CORRECTIONS[name](old, rollout, mask.float(), low=None, high=None,
                                           self_normalize=False)
    assert w.shape == mask.shape and torch.isfinite(w).all() and (w[~mask] == 0).all()
    assert not w.requires_grad
    expected = set() if name == "none" else {"weight_mean", "truncated_frac", "masked_frac",
                                             "rejected_frac", "ess"}
    assert set(metrics) == expected
    assert all(v.dim() == 0 and torch.isfinite(v) for v in metrics.values())
    if name != "none":
        entry = ROLLOUT_CORRECTIONS[name]
        assert entry.source and 0 <= entry.low <= 1 <= entry.high < INF


def test_bad_bounds_raise():
    old, rollout, mask = _token_batch()
    for low, high in ((1.5, 2.0), (0.5, 0.9), (-0.1, 2.0), (0.5, INF)):
        with pytest.raises(ValueError, match="low <= 1 <= high"):
            ROLLOUT_CORRECTIONS["tis"](old, rollout, mask, low=low, high=high)
    with pytest.raises(ValueError, match="level"):
        importance_weights(old, rollout, mask, level="batch", mode="mask", low=0.5, high=2.0)
    assert math.isfinite(ROLLOUT_CORRECTIONS["icepop"].high)
