"""Policy losses: worked examples from the papers, dual-clip, GSPO gradients, CISPO, masking."""

import math

import pytest
import torch

from moerl.algos.aggregation import seq_mean_token_mean, token_mean
from moerl.algos.policy_losses import (
    POLICY_LOSSES,
    cispo_loss,
    gspo_loss,
    gspo_token_loss,
    ppo_clip_loss,
)

KWARGS = {  # every entry takes the same keywords
    "ppo_clip": {"eps_low": 0.2, "eps_high": 0.28, "dual_clip_c": 3.0},
    "dual_clip": {"eps_low": 0.2, "eps_high": 0.28, "dual_clip_c": 3.0},
    "gspo": {"eps_low": 3e-4, "eps_high": 4e-4, "dual_clip_c": 3.0},
    "gspo_token": {"eps_low": 3e-4, "eps_high": 4e-4, "dual_clip_c": 3.0},
    "cispo": {"eps_low": None, "eps_high": 0.28, "dual_clip_c": 3.0},
}
METRIC_KEYS = {"clipfrac_low", "clipfrac_high", "clipfrac", "seq_clipfrac", "ppo_kl"}


def _two_token_example():
    # One response, two tokens, pi_old = 1 so the ratios are the new probabilities: [2.0, 0.4].
    logprobs = torch.log(torch.tensor([[2.0, 0.4]])).requires_grad_()
    old = torch.zeros(1, 2)
    adv = torch.ones(1, 2)
    mask = torch.ones(1, 2, dtype=torch.bool)
    return logprobs, old, adv, mask


def test_grpo_token_clip_worked_example():
    logprobs, old, adv, mask = _two_token_example()
    # The seed's number: clip each token ratio to [0.8, 1.2] and average: (1.2 + 0.8) / 2 = 1.0.
    clipped_ratios = logprobs.detach().exp().clamp(0.8, 1.2)
    assert clipped_ratios.mean().item() == pytest.approx(1.0)
    # The PPO/GRPO objective also takes the pessimistic min with the unclipped term. With A = 1:
    # token 1: min(2.0, 1.2) = 1.2; token 2: min(0.4, 0.8) = 0.4 (the clip only caps increases
    # of a positive-advantage token). Objective (1.2 + 0.4) / 2 = 0.8, loss -0.8.
    loss, metrics = ppo_clip_loss(logprobs, old, adv, mask, eps_low=0.2, eps_high=0.2)
    torch.testing.assert_close(loss, torch.tensor([[-1.2, -0.4]]))
    total = seq_mean_token_mean(loss, mask)
    assert total.item() == pytest.approx(-0.8)
    total.backward()
    # d/dlogp of -(1/2) r_t: token 1 is clipped (no gradient); token 2: -(1/2) * 0.4 = -0.2.
    torch.testing.assert_close(logprobs.grad, torch.tensor([[0.0, -0.2]]))
    assert metrics["clipfrac_high"].item() == pytest.approx(0.5)
    assert metrics["clipfrac_low"].item() == 0.0
    assert metrics["seq_clipfrac"].item() == 1.0


def test_gspo_sequence_ratio_worked_example():
    logprobs, old, adv, mask = _two_token_example()
    # s = exp((ln 2 + ln 0.4) / 2) = sqrt(0.8) = 0.894427..., inside [0.8, 1.2], so the objective
    # is s * A = 0.894427 on the sequence (written on both tokens).
    loss, metrics = gspo_loss(logprobs, old, adv, mask, eps_low=0.2, eps_high=0.2)
    s = math.exp((math.log(2.0) + math.log(0.4)) / 2)
    assert s == pytest.approx(0.894427, abs=1e-6)
    torch.testing.assert_close(loss, torch.full((1, 2), -s))
    assert seq_mean_token_mean(loss, mask).item() == pytest.approx(-s)
    assert metrics["seq_clipfrac"].item() == 0.0


def test_clip_higher_is_asymmetric():
    # DAPO's decoupled bounds 0.2 / 0.28: A > 0 with ratio 1.25 is inside the upper bound (no
    # clip), A < 0 with ratio 0.75 is below 1 - 0.2 (clipped at 0.8).
    logprobs = torch.log(torch.tensor([[1.25, 0.75]]))
    adv = torch.tensor([[1.0, -1.0]])
    mask = torch.ones(1, 2, dtype=torch.bool)
    loss, m = ppo_clip_loss(logprobs, torch.zeros(1, 2), adv, mask, eps_low=0.2, eps_high=0.28)
    # token 1: -min(1.25, 1.25) = -1.25; token 2: -min(-0.75, -0.8) = 0.8.
    torch.testing.assert_close(loss, torch.tensor([[-1.25, 0.8]]))
    assert m["clipfrac_high"].item() == 0.0
    assert m["clipfrac_low"].item() == pytest.approx(0.5)


def test_dual_clip_bounds_negative_advantage():
    # A = -1, eps = 0.2, c = 3. Ratios [5.0, 2.0, 0.5]:
    #   r = 5: PPO-clip gives max(5, 1.2) = 5, dual-clip caps at -c*A = 3 (no gradient);
    #   r = 2: max(2, 1.2) = 2 < 3, unchanged, gradient d(-A r)/dlogp = r = 2;
    #   r = 0.5: max(0.5, 0.8) = 0.8, the ordinary low clip (no gradient).
    logprobs = torch.log(torch.tensor([[5.0, 2.0, 0.5]])).requires_grad_()
    adv = -torch.ones(1, 3)
    mask = torch.ones(1, 3, dtype=torch.bool)
    loss, m = ppo_clip_loss(
        logprobs, torch.zeros(1, 3), adv, mask, eps_low=0.2, eps_high=0.2, clip_ratio_c=3.0
    )
    torch.testing.assert_close(loss, torch.tensor([[3.0, 2.0, 0.8]]))
    loss.sum().backward()
    torch.testing.assert_close(logprobs.grad, torch.tensor([[0.0, 2.0, 0.0]]))
    assert m["clipfrac_dual"].item() == pytest.approx(1 / 3)
    assert m["clipfrac_low"].item() == pytest.approx(1 / 3)
    # Without dual-clip the r = 5 token costs 5 and keeps a gradient of 5.
    plain, _ = ppo_clip_loss(logprobs, torch.zeros(1, 3), adv, mask, eps_low=0.2, eps_high=0.2)
    assert plain[0, 0].item() == pytest.approx(5.0)


def test_dual_clip_equals_ppo_clip_for_nonnegative_advantages():
    torch.manual_seed(0)
    logprobs = (torch.randn(4, 6) * 2).requires_grad_()
    old = torch.randn(4, 6)
    adv = torch.rand(4, 6) * 3  # A >= 0
    adv[0] = 0.0
    mask = torch.ones(4, 6, dtype=torch.bool)
    dual, _ = POLICY_LOSSES["dual_clip"](logprobs, old, adv, mask, eps_low=0.2, eps_high=0.2)
    plain, _ = POLICY_LOSSES["ppo_clip"](logprobs, old, adv, mask, eps_low=0.2, eps_high=0.2)
    torch.testing.assert_close(dual, plain)
    (g_dual,) = torch.autograd.grad(dual.sum(), logprobs)
    (g_plain,) = torch.autograd.grad(plain.sum(), logprobs)
    torch.testing.assert_close(g_dual, g_plain)


def _gspo_batch():
    # Four responses of lengths 2, 4, 3, 1 (padded to 4 with garbage) with chosen mean
    # log-ratios, and eps = 0.05:
    #   seq 0: A = +1.0, mean log-ratio +0.02 -> s = 1.0202, inside  -> gradient
    #   seq 1: A = -0.5, mean log-ratio -0.10 -> s = 0.9048 < 0.95, A < 0 -> clipped, no gradient
    #   seq 2: A = +2.0, mean log-ratio +0.10 -> s = 1.1052 > 1.05, A > 0 -> clipped, no gradient
    #   seq 3: A = -1.0, mean log-ratio +0.10 -> s = 1.1052, A < 0 -> unclipped (min picks it)
    lengths = [2, 4, 3, 1]
    seq_log_ratio = [0.02, -0.10, 0.10, 0.10]
    seq_adv = [1.0, -0.5, 2.0, -1.0]
    torch.manual_seed(1)
    old = torch.randn(4, 4) - 2.0
    mask = torch.zeros(4, 4, dtype=torch.bool)
    delta = torch.zeros(4, 4)
    for i, n in enumerate(lengths):
        mask[i, :n] = True
        # Token log-ratios that differ per token but average to the chosen value.
        wiggle = torch.linspace(-0.05, 0.05, n) if n > 1 else torch.zeros(1)
        delta[i, :n] = seq_log_ratio[i] + wiggle
    logprobs = (old + delta).masked_fill(~mask, float("nan")).requires_grad_()
    old = old.masked_fill(~mask, float("inf"))
    adv = torch.tensor(seq_adv)[:, None].expand(4, 4).masked_fill(~mask, float("-inf"))
    return logprobs, old, adv, mask, lengths, seq_log_ratio, seq_adv


def test_gspo_gradient_matches_paper():
    logprobs, old, adv, mask, lengths, seq_log_ratio, seq_adv = _gspo_batch()
    loss, metrics = gspo_loss(logprobs, old, adv, mask, eps_low=0.05, eps_high=0.05)
    seq_mean_token_mean(loss, mask).backward()
    # GSPO eq. 10: grad J = (1/G) sum_i s_i A_i (1/|y_i|) sum_t grad log pi(y_it) for sequences
    # whose clip is inactive, 0 for clipped ones. The loss is -J, hence the minus sign.
    expected = torch.zeros(4, 4)
    active = [True, False, False, True]
    for i, n in enumerate(lengths):
        if active[i]:
            s = math.exp(seq_log_ratio[i])
            expected[i, :n] = -(1 / 4) * s * seq_adv[i] / n
    torch.testing.assert_close(logprobs.grad, expected)
    assert metrics["seq_clipfrac"].item() == pytest.approx(0.5)
    # Token-level clip fractions count the tokens of clipped sequences: 4 of 10 (low), 3 (high).
    assert metrics["clipfrac_low"].item() == pytest.approx(0.4)
    assert metrics["clipfrac_high"].item() == pytest.approx(0.3)


def test_gspo_token_equals_gspo_with_sequence_constant_advantages():
    logprobs, old, adv, mask, *_ = _gspo_batch()
    seq_loss, seq_m = gspo_loss(logprobs, old, adv, mask, eps_low=0.05, eps_high=0.05)
    tok_loss, tok_m = gspo_token_loss(logprobs, old, adv, mask, eps_low=0.05, eps_high=0.05)
    torch.testing.assert_close(tok_loss, seq_loss)
    seq_total = seq_mean_token_mean(seq_loss, mask)
    tok_total = seq_mean_token_mean(tok_loss, mask)
    torch.testing.assert_close(tok_total, seq_total)
    (g_seq,) = torch.autograd.grad(seq_total, logprobs)
    (g_tok,) = torch.autograd.grad(tok_total, logprobs)
    torch.testing.assert_close(g_tok, g_seq)
    for key in METRIC_KEYS:
        torch.testing.assert_close(tok_m[key], seq_m[key])


def test_gspo_token_uses_each_tokens_advantage():
    # One response, log-ratios 0 (s = 1), token advantages [+1, -1]: per-token loss [-1, +1], and
    # with seq_mean_token_mean the gradient is -(1/2) s A_t = [-0.5, +0.5].
    logprobs = torch.zeros(1, 2, requires_grad=True)
    adv = torch.tensor([[1.0, -1.0]])
    mask = torch.ones(1, 2, dtype=torch.bool)
    loss, _ = gspo_token_loss(logprobs, torch.zeros(1, 2), adv, mask, eps_low=0.1, eps_high=0.1)
    torch.testing.assert_close(loss, torch.tensor([[-1.0, 1.0]]))
    seq_mean_token_mean(loss, mask).backward()
    torch.testing.assert_close(logprobs.grad, torch.tensor([[-0.5, 0.5]]))


def test_cispo_clips_weights_not_gradients():
    # ratios [2.0, 0.4, 1.1], A = [1, 1, -1], eps_high = 0.28, no lower bound:
    # weights sg(clip(r, max=1.28)) = [1.28, 0.4, 1.1]; loss -w A logp; with token_mean over 3
    # tokens the gradient is -w A / 3 = [-1.28/3, -0.4/3, +1.1/3]: the clipped token keeps one.
    logprobs = torch.log(torch.tensor([[2.0, 0.4, 1.1]])).requires_grad_()
    adv = torch.tensor([[1.0, 1.0, -1.0]])
    mask = torch.ones(1, 3, dtype=torch.bool)
    loss, m = cispo_loss(logprobs, torch.zeros(1, 3), adv, mask, eps_high=0.28)
    token_mean(loss, mask).backward()
    torch.testing.assert_close(logprobs.grad, torch.tensor([[-1.28 / 3, -0.4 / 3, 1.1 / 3]]))
    assert m["clipfrac_high"].item() == pytest.approx(1 / 3)
    assert m["clipfrac_low"].item() == 0.0
    # With eps_low = 0.2 the 0.4 weight is raised to 0.8.
    logprobs.grad = None
    loss, m = cispo_loss(logprobs, torch.zeros(1, 3), adv, mask, eps_high=0.28, eps_low=0.2)
    token_mean(loss, mask).backward()
    torch.testing.assert_close(logprobs.grad, torch.tensor([[-1.28 / 3, -0.8 / 3, 1.1 / 3]]))
    assert m["clipfrac_low"].item() == pytest.approx(1 / 3)


def test_ppo_kl_metric():
    # ppo_kl = mean(old - new) over counted tokens: old - new = [0.1, -0.3], padding ignored.
    logprobs = torch.tensor([[-1.0, -2.0, 99.0]])
    old = torch.tensor([[-0.9, -2.3, -99.0]])
    mask = torch.tensor([[1.0, 1.0, 0.0]])
    _, m = ppo_clip_loss(logprobs, old, torch.ones(1, 3), mask, eps_low=0.2, eps_high=0.2)
    assert m["ppo_kl"].item() == pytest.approx(-0.1, abs=1e-6)


def _garbage_batch(garbage: bool):
    torch.manual_seed(2)
    mask = torch.tensor(
        [[1, 1, 1, 1, 0], [1, 1, 0, 0, 0], [0, 0, 0, 0, 0], [1, 1, 1, 1, 1]], dtype=torch.bool
    )
    logprobs = torch.randn(4, 5) * 0.3 - 1.0
    old = logprobs + torch.randn(4, 5) * 0.3
    adv = torch.randn(4, 1).expand(4, 5).clone()
    if garbage:
        pad = ~mask
        logprobs = logprobs.masked_fill(pad, float("nan"))
        logprobs[1, 3] = float("inf")
        old = old.masked_fill(pad, -1e4)
        old[0, 4] = float("-inf")
        adv = adv.masked_fill(pad, float("nan"))
        adv[1, 4] = float("inf")
    else:
        logprobs, old, adv = (x.masked_fill(~mask, 0.0) for x in (logprobs, old, adv))
    return logprobs.requires_grad_(), old, adv, mask


@pytest.mark.parametrize("name", sorted(POLICY_LOSSES))
def test_registry_entry_ignores_padding_garbage(name):
    assert set(POLICY_LOSSES) == set(KWARGS)
    results = []
    for garbage in (True, False):
        logprobs, old, adv, mask = _garbage_batch(garbage)
        loss, metrics = POLICY_LOSSES[name](logprobs, old, adv, mask, **KWARGS[name])
        assert loss.shape == mask.shape
        assert torch.isfinite(loss).all()
        assert (loss[~mask] == 0).all()
        total = seq_mean_token_mean(loss, mask) + token_mean(loss, mask)
        (grad,) = torch.autograd.grad(total, logprobs)
        assert torch.isfinite(grad).all()
        assert (grad[~mask] == 0).all()
        assert grad[mask].abs().sum() > 0
        assert METRIC_KEYS <= set(metrics)
        for value in metrics.values():
            assert value.dim() == 0 and not value.requires_grad and torch.isfinite(value)
        results.append((loss.detach(), grad, metrics))
    # Garbage and clean padding give identical results.
    torch.testing.assert_close(results[0][0], results[1][0])
    torch.testing.assert_close(results[0][1], results[1][1])
    for key in results[0][2]:
        torch.testing.assert_close(results[0][2][key], results[1][2][key])


@pytest.mark.parametrize("name", sorted(POLICY_LOSSES))
def test_registry_entry_float_mask_equals_bool_mask(name):
    logprobs, old, adv, mask = _garbage_batch(True)
    bool_loss, _ = POLICY_LOSSES[name](logprobs, old, adv, mask, **KWARGS[name])
    float_loss, _ = POLICY_LOSSES[name](logprobs, old, adv, mask.float(), **KWARGS[name])
    torch.testing.assert_close(bool_loss, float_loss)


def test_no_overflow_for_extreme_log_ratio():
    # A counted token whose log-ratio is 500 (exp would be inf) stays finite with A < 0.
    logprobs = torch.tensor([[0.0, -1.0]], requires_grad=True)
    old = torch.tensor([[-500.0, -1.0]])
    adv = -torch.ones(1, 2)
    mask = torch.ones(1, 2, dtype=torch.bool)
    for name in POLICY_LOSSES:
        loss, _ = POLICY_LOSSES[name](logprobs, old, adv, mask, **KWARGS[name])
        (grad,) = torch.autograd.grad(loss.sum(), logprobs)
        assert torch.isfinite(loss).all() and torch.isfinite(grad).all(), name


def test_bad_arguments_raise():
    logprobs, old, adv, mask = _garbage_batch(False)
    with pytest.raises(ValueError, match="eps_low"):
        ppo_clip_loss(logprobs, old, adv, mask, eps_low=1.5, eps_high=0.2)
    with pytest.raises(ValueError, match="clip_ratio_c"):
        ppo_clip_loss(logprobs, old, adv, mask, eps_low=0.2, eps_high=0.2, clip_ratio_c=0.5)
    with pytest.raises(ValueError, match="shape"):
        gspo_loss(logprobs, old[:, :3], adv, mask, eps_low=0.2, eps_high=0.2)
    with pytest.raises(TypeError):
        gspo_loss(logprobs, old, adv, mask, eps_low=0.2, eps_high=0.2, clip_ratio_c=3.0)
