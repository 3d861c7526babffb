"""Clipped value loss, entropy bonus, PPO-ptx term and DPO against hand-computed values."""

import math

import pytest
import torch

from moerl.algos.dpo import dpo_loss, sequence_logprobs
from moerl.algos.value import clipped_value_loss, entropy_bonus_loss, ptx_loss

NAN, INF = float("nan"), float("inf")


def test_clipped_value_loss_hand_example():
    # V = [1.0, 0.0, 2.0], V_old = [0.5, 0.5, 2.0], R = [1.5, 1.0, 0.0], eps = 0.2:
    # tok 0: (1 - 1.5)^2 = 0.25; clipped V = 0.5 + 0.2 = 0.7, (0.7 - 1.5)^2 = 0.64 -> 0.32,
    #        clipped branch larger, so no gradient;
    # tok 1: (0 - 1)^2 = 1; clipped V = 0.3, (0.3 - 1)^2 = 0.49 -> 0.5, gradient V - R = -1;
    # tok 2: V = V_old, both 4 -> 2, gradient V - R = 2. vf_clipfrac = 1/3.
    values = torch.tensor([[1.0, 0.0, 2.0, NAN]], requires_grad=True)
    old_values = torch.tensor([[0.5, 0.5, 2.0, INF]])
    returns = torch.tensor([[1.5, 1.0, 0.0, -INF]])
    mask = torch.tensor([[1, 1, 1, 0]])
    loss, m = clipped_value_loss(values, old_values, returns, mask, clip_eps=0.2)
    torch.testing.assert_close(loss, torch.tensor([[0.32, 0.5, 2.0, 0.0]]))
    assert m["vf_clipfrac"].item() == pytest.approx(1 / 3)
    loss.sum().backward()
    torch.testing.assert_close(values.grad, torch.tensor([[0.0, -1.0, 2.0, 0.0]]))
    # Without clipping: (V - R)^2 / 2 = [0.125, 0.5, 2.0].
    plain, m = clipped_value_loss(values, old_values, returns, mask, clip_eps=None)
    torch.testing.assert_close(plain, torch.tensor([[0.125, 0.5, 2.0, 0.0]]))
    assert m["vf_clipfrac"].item() == 0.0


def test_entropy_bonus_and_ptx_terms():
    mask = torch.tensor([[1, 1, 0]])
    entropy = torch.tensor([[1.0, 2.0, NAN]], requires_grad=True)
    bonus = entropy_bonus_loss(entropy, mask, coef=0.01)
    torch.testing.assert_close(bonus, torch.tensor([[-0.01, -0.02, 0.0]]))
    bonus.sum().backward()
    torch.testing.assert_close(entropy.grad, torch.tensor([[-0.01, -0.01, 0.0]]))
    # PPO-ptx: -coef * log pi = -0.5 * [-2, -3] = [1.0, 1.5].
    ptx = ptx_loss(torch.tensor([[-2.0, -3.0, -INF]]), mask, coef=0.5)
    torch.testing.assert_close(ptx, torch.tensor([[1.0, 1.5, 0.0]]))


def test_dpo_hand_example():
    # beta = 0.1.
    # pair 0: chosen  -10 vs ref -12 -> reward 0.2; rejected -15 vs ref -14 -> -0.1;
    #         margin 0.3, loss = log(1 + e^-0.3) = 0.554355.
    # pair 1: chosen  -10 vs ref -9  -> -0.1; rejected -10 vs ref -11 -> 0.1;
    #         margin -0.2, loss = log(1 + e^0.2) = 0.798139.
    # accuracy 1/2, mean margin 0.05; d loss_0 / d chosen_0 = -beta * sigmoid(-0.3) = -0.0425557.
    chosen = torch.tensor([-10.0, -10.0], requires_grad=True)
    rejected = torch.tensor([-15.0, -10.0])
    ref_chosen = torch.tensor([-12.0, -9.0])
    ref_rejected = torch.tensor([-14.0, -11.0])
    loss, m = dpo_loss(chosen, rejected, ref_chosen, ref_rejected, beta=0.1)
    torch.testing.assert_close(loss, torch.tensor([0.554355, 0.798139]))
    assert m["reward_accuracy"].item() == 0.5
    assert m["reward_margin"].item() == pytest.approx(0.05, abs=1e-6)
    assert m["chosen_reward"].item() == pytest.approx(0.05, abs=1e-6)
    assert m["rejected_reward"].item() == pytest.approx(0.0, abs=1e-6)
    loss.sum().backward()
    assert chosen.grad[0].item() == pytest.approx(-0.1 / (1 + math.exp(0.3)), abs=1e-6)


def test_sequence_logprobs_masks_garbage():
    logprobs = torch.tensor([[-1.0, -2.0, NAN], [-0.5, -INF, INF]], requires_grad=True)
    mask = torch.tensor([[1, 1, 0], [1, 0, 0]])
    out = sequence_logprobs(logprobs, mask)
    torch.testing.assert_close(out, torch.tensor([-3.0, -0.5]))
    out.sum().backward()
    torch.testing.assert_close(logprobs.grad, mask.float())


def test_dpo_bad_inputs():
    x = torch.zeros(2)
    with pytest.raises(ValueError, match="beta"):
        dpo_loss(x, x, x, x, beta=0.0)
    with pytest.raises(ValueError, match="1-D"):
        dpo_loss(x, torch.zeros(3), x, x, beta=0.1)
