"""KL estimators: hand values, DeepSeek-V3.2's unbiased estimator (expectation and gradient)."""

import math

import pytest
import torch

from moerl.algos.kl import KL_ESTIMATORS, kl_k3, kl_k3_unbiased, kl_penalized_rewards


def test_hand_values():
    # pi_theta = 0.5, pi_ref = 0.25, pi_old = 0.4; x = log(pi_ref / pi_theta) = -ln 2.
    # k1 = ln 2 = 0.693147; k2 = (ln 2)^2 / 2 = 0.240227; k3 = 0.5 + ln 2 - 1 = 0.193147;
    # k3_unbiased = (0.5 / 0.4) * k3 = 1.25 * 0.193147 = 0.241434.
    logprobs = torch.log(torch.tensor([[0.5, 0.3]]))
    ref = torch.log(torch.tensor([[0.25, 0.1]]))
    old = torch.log(torch.tensor([[0.4, 0.9]]))
    mask = torch.tensor([[True, False]])
    expected = {"k1": 0.693147, "k2": 0.240227, "k3": 0.193147, "k3_unbiased": 0.241434}
    for name, value in expected.items():
        kl = KL_ESTIMATORS[name](logprobs, ref, mask, old_logprobs_BT=old)
        assert kl[0, 0].item() == pytest.approx(value, abs=1e-6), name
        assert kl[0, 1].item() == 0.0


def _categorical(seed=0, k=5):
    g = torch.Generator().manual_seed(seed)
    theta = torch.randn(k, generator=g, dtype=torch.float64, requires_grad=True)
    log_ref = torch.log_softmax(torch.randn(k, generator=g, dtype=torch.float64), -1)
    log_old = torch.log_softmax(torch.randn(k, generator=g, dtype=torch.float64), -1)
    return theta, log_ref, log_old


def _true_kl(log_theta, log_ref):
    return (log_theta.exp() * (log_theta - log_ref)).sum()


def test_unbiased_kl_monte_carlo_under_pi_old():
    theta, log_ref, log_old = _categorical()
    log_theta = torch.log_softmax(theta, -1).detach()
    n = 200_000
    gen = torch.Generator().manual_seed(1)
    samples = torch.multinomial(log_old.exp(), n, replacement=True, generator=gen)
    ones = torch.ones(1, n, dtype=torch.bool)
    est = kl_k3_unbiased(
        log_theta[samples][None],
        log_ref[samples][None],
        ones,
        old_logprobs_BT=log_old[samples][None],
    )[0]
    target = _true_kl(log_theta, log_ref).item()
    stderr = est.std().item() / math.sqrt(n)
    assert abs(est.mean().item() - target) < 4 * stderr
    # Plain k3 on the same pi_old samples estimates E_old[k3], not KL(pi_theta || pi_ref).
    biased = kl_k3(log_theta[samples][None], log_ref[samples][None], ones)[0]
    assert abs(biased.mean().item() - target) > 10 * stderr


def _expected_under_old(estimator, theta, log_ref, log_old):
    """Exact E_{y ~ pi_old}[estimator(y)] on a categorical, as a function of theta."""
    log_theta = torch.log_softmax(theta, -1)
    ones = torch.ones(1, theta.numel(), dtype=torch.bool)
    per_y = estimator(log_theta[None], log_ref[None], ones, old_logprobs_BT=log_old[None])[0]
    return (log_old.exp() * per_y).sum()


def test_unbiased_kl_exact_expectation_and_gradient():
    theta, log_ref, log_old = _categorical(seed=2)
    expectation = _expected_under_old(kl_k3_unbiased, theta, log_ref, log_old)
    true_kl = _true_kl(torch.log_softmax(theta, -1), log_ref)
    torch.testing.assert_close(expectation, true_kl)
    # The gradient flows through the pi_theta / pi_old ratio: grad E_old[estimate] = grad KL.
    (g_est,) = torch.autograd.grad(expectation, theta)
    (g_true,) = torch.autograd.grad(true_kl, theta)
    torch.testing.assert_close(g_est, g_true)

    # Control: the same estimator with the ratio detached has the right value but a wrong
    # gradient, so the assertion above can fail.
    def detached_ratio(logprobs, ref, mask, *, old_logprobs_BT):
        ratio = (logprobs - old_logprobs_BT).exp().detach()
        return ratio * kl_k3(logprobs, ref, mask)

    wrong = _expected_under_old(detached_ratio, theta, log_ref, log_old)
    (g_wrong,) = torch.autograd.grad(wrong, theta)
    assert not torch.allclose(g_wrong, g_true, atol=1e-3)


def test_unbiased_kl_needs_old_logprobs():
    x = torch.zeros(1, 2)
    with pytest.raises(ValueError, match="old_logprobs_BT"):
        KL_ESTIMATORS["k3_unbiased"](x, x, torch.ones(1, 2))


@pytest.mark.parametrize("name", sorted(KL_ESTIMATORS))
def test_garbage_padding_finite_and_zero_gradient(name):
    mask = torch.tensor([[1, 1, 0], [1, 0, 0]], dtype=torch.bool)
    logprobs = torch.tensor([[-1.0, -2.0, float("nan")], [-0.5, float("inf"), 3.0]])
    logprobs.requires_grad_()
    ref = torch.tensor([[-1.5, -1.0, float("-inf")], [-0.7, 50.0, float("nan")]])
    old = torch.tensor([[-1.2, -2.5, 80.0], [-0.4, float("-inf"), 0.0]])
    kl = KL_ESTIMATORS[name](logprobs, ref, mask, old_logprobs_BT=old)
    assert torch.isfinite(kl).all() and (kl[~mask] == 0).all()
    (grad,) = torch.autograd.grad(kl.sum(), logprobs)
    assert torch.isfinite(grad).all() and (grad[~mask] == 0).all() and (grad[mask] != 0).all()


def test_k3_stays_finite_for_extreme_counted_tokens():
    # log pi_ref - log pi_theta = 300 would overflow exp; the log-ratio is clamped to 20.
    kl = kl_k3(torch.tensor([[-300.0]]), torch.tensor([[0.0]]), torch.ones(1, 1))
    assert kl.item() == pytest.approx(math.expm1(20.0) - 20.0, rel=1e-5)


def test_kl_penalized_rewards():
    # Outcome reward 1 on the last token, k1 = logp - ref = [0.2, -0.1, 0.3], beta = 0.5:
    # rewards = [-0.1, 0.05, 1 - 0.15] = [-0.1, 0.05, 0.85]; padding stays 0.
    token_rewards = torch.tensor([[0.0, 0.0, 1.0, float("nan")]])
    logprobs = torch.tensor([[-1.0, -2.0, -0.5, 7.0]], requires_grad=True)
    ref = torch.tensor([[-1.2, -1.9, -0.8, float("nan")]])
    mask = torch.tensor([[1, 1, 1, 0]])
    out = kl_penalized_rewards(token_rewards, logprobs, ref, mask, beta=0.5)
    torch.testing.assert_close(out, torch.tensor([[-0.1, 0.05, 0.85, 0.0]]))
    assert not out.requires_grad
    with pytest.raises(ValueError, match="k1, k2 or k3"):
        kl_penalized_rewards(token_rewards, logprobs, ref, mask, beta=0.5, estimator="k3_unbiased")
