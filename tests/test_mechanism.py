"""moerl.mechanism: the mismatch and gradient split by routing, on hand-made inputs."""

import math

import pytest
import torch

from moerl.batch import RolloutBatch
from moerl.config import load_config
from moerl.mechanism import NUM_BINS, grad_split_metrics, grad_split_sums, mismatch_split_counts
from moerl.mechanism import mismatch_split_metrics, policy_grad_weights, route_diff_layers
from moerl.mechanism import update_sums
from moerl.objective import Objective, compute_rollout_weights


def test_route_diff_layers_counts_set_differences_per_token():
    a = torch.tensor([[[[0, 1], [2, 3], [4, 5]], [[0, 1], [2, 3], [4, 5]]]])  # [1, 2, 3, 2]
    b = torch.tensor([[[[1, 0], [3, 2], [5, 4]],    # same sets, other order: 0 layers
                       [[0, 6], [2, 3], [4, 7]]]])  # layers 0 and 2 differ
    assert route_diff_layers(a, b).tolist() == [[0, 2]]
    with pytest.raises(ValueError, match=r"\[B, T, L, K\]"):
        route_diff_layers(a, b[..., :1])


def test_mismatch_split_separates_groups_bins_and_layers():
    logratio = torch.tensor([[5e-5, -2e-3, 0.5, 9.0, 0.0]])
    diff_layers = torch.tensor([[0, 0, 1, 3, 2]])
    mask = torch.tensor([[True, True, True, True, False]])  # the last token does not count
    counts = mismatch_split_counts(logratio, diff_layers, mask, num_layers=3)
    m = mismatch_split_metrics(counts, num_layers=3)
    assert m["mech/tokens_same"] == 2 and m["mech/tokens_rerouted"] == 2
    assert m["mech/abs_logratio_same"] == pytest.approx((5e-5 + 2e-3) / 2)
    assert m["mech/abs_logratio_rerouted"] == pytest.approx((0.5 + 9.0) / 2)
    same = [m[f"mech/hist_same_b{i}"] for i in range(NUM_BINS)]
    rerouted = [m[f"mech/hist_rerouted_b{i}"] for i in range(NUM_BINS)]
    assert same == [1, 0, 0, 1, 0, 0, 0, 0, 0, 0]  # 5e-5 < 1e-4; 1e-3 < 2e-3 <= 3e-3
    assert rerouted == [0, 0, 0, 0, 0, 0, 0, 0, 1, 1]  # 0.3 < 0.5 <= 1; 9 in the open bin
    k3 = lambda x: math.expm1(x) - x  # noqa: E731
    assert m["mech/tokens_dlayers0"] == 2
    assert m["mech/k3_dlayers0"] == pytest.approx((k3(5e-5) + k3(-2e-3)) / 2, rel=1e-6)
    assert m["mech/k3_dlayers1"] == pytest.approx(k3(0.5))
    assert math.isnan(m["mech/k3_dlayers2"]) and m["mech/tokens_dlayers2"] == 0  # masked out
    assert m["mech/k3_dlayers3"] == pytest.approx(k3(9.0))
    # Additive: two halves summed give the whole.
    halves = (mismatch_split_counts(logratio[:, :2], diff_layers[:, :2], mask[:, :2], num_layers=3)
              + mismatch_split_counts(logratio[:, 2:], diff_layers[:, 2:], mask[:, 2:],
                                      num_layers=3))
    torch.testing.assert_close(halves, counts)
    with pytest.raises(ValueError, match="num_layers"):
        mismatch_split_counts(logratio, diff_layers, mask, num_layers=2)


def test_grad_split_shares_and_clip_fractions():
    grad = torch.tensor([[0.0, -0.5, 0.25, 0.0], [-1.0, 0.0, 0.0, 0.0]])
    adv = torch.tensor([[1.0, 1.0, -1.0, 0.0], [2.0, 2.0, 2.0, 2.0]])
    mask = torch.tensor([[True, True, True, True], [True, True, False, False]])
    rerouted = torch.tensor([[False, False, True, True], [True, True, False, False]])
    sums = {k: v.item() for k, v in grad_split_sums(grad, adv, mask, rerouted).items()}
    assert sums["mech_sum/tokens_same"] == 2 and sums["mech_sum/tokens_rerouted"] == 4
    assert sums["mech_sum/grad_same"] == 0.5 and sums["mech_sum/grad_rerouted"] == 1.25
    # Active = nonzero advantage: the rerouted (0, 3) has advantage 0 and is not a clip.
    assert sums["mech_sum/active_rerouted"] == 3 and sums["mech_sum/clipped_rerouted"] == 1
    m = grad_split_metrics(sums)
    assert m["mech/grad_share_rerouted"] == pytest.approx(1.25 / 1.75)
    assert m["mech/clipfrac_same"] == 0.5 and m["mech/clipfrac_rerouted"] == pytest.approx(1 / 3)
    assert m["mech/grad_per_token_same"] == 0.25
    # A common scale (averaging over micro-batches or ranks) leaves the ratios unchanged.
    assert grad_split_metrics({k: v / 3 for k, v in sums.items()}) == pytest.approx(m)


def _batch(old, rollout, adv, mask, routes=None, trainer_routes=None):
    rows, width = old.shape
    zeros = torch.zeros(rows, dtype=torch.long)
    return RolloutBatch(
        tokens_BT=torch.zeros(rows, width, dtype=torch.long),
        targets_BT=torch.zeros(rows, width, dtype=torch.long), response_mask_BT=mask,
        prompt_lengths_B=zeros + 1, response_lengths_B=mask.sum(-1) - 1,
        rollout_logprobs_BT=rollout, truncated_B=torch.zeros(rows, dtype=torch.bool),
        group_ids_B=zeros, old_logprobs_BT=old, advantages_BT=adv, routes_BTLK=routes,
        trainer_routes_BTLK=trainer_routes)


def test_policy_grad_weights_is_zero_exactly_on_clipped_tokens():
    cfg = load_config(overrides=["algorithm.kl_coef=0.04", "algorithm.kl_estimator=k3",
                                 "algorithm.aggregation=token_mean"])
    obj = Objective.from_config(cfg.algorithm, cfg.rollout)  # GRPO: ppo_clip, eps 0.2
    old = torch.zeros(1, 3)
    adv = torch.tensor([[1.0, 1.0, -1.0]])
    mask = torch.ones(1, 3, dtype=torch.bool)
    # Ratios e^0.1 (inside), e^0.5 (clipped, A > 0), e^0.5 (A < 0: the clip does not bind).
    routes = torch.tensor([[[[0, 1]], [[0, 1]], [[2, 3]]]])
    trainer = torch.tensor([[[[1, 0]], [[0, 2]], [[2, 3]]]])
    mb = _batch(old, old.clone(), adv, mask, routes, trainer)
    compute_rollout_weights(mb, obj)
    logprobs = torch.tensor([[0.1, 0.5, 0.5]], requires_grad=True)
    tokens, seqs = mask.sum().float(), torch.tensor(1.0)
    grad = policy_grad_weights(mb, logprobs, obj, global_num_tokens=tokens, global_num_seqs=seqs)
    expected = torch.tensor([[-math.exp(0.1), 0.0, math.exp(0.5)]]) / 3  # -A * ratio / tokens
    torch.testing.assert_close(grad, expected)
    sums = update_sums(mb, logprobs, obj, global_num_tokens=tokens, global_num_seqs=seqs)
    m = grad_split_metrics({k: v.item() for k, v in sums.items()})
    assert m["mech/clipfrac_rerouted"] == 1.0 and m["mech/clipfrac_same"] == 0.0
    assert m["mech/grad_share_rerouted"] == 0.0
    assert update_sums(_batch(old, old, adv, mask), logprobs, obj, global_num_tokens=tokens,
                       global_num_seqs=seqs) == {}  # no routes: nothing to split


def test_warm_start_route_fragility_counts_answer_tokens(tmp_path):
    """moerl.warmstart.route_fragility: fp32 against itself reroutes nothing; bf16 reroutes some
    answer tokens of a small random all-MoE model; only answer tokens count."""
    from transformers import AutoModelForCausalLM

    from moerl.tasks.chain import ChainArithmeticTask
    from moerl.tiny_model import TINY_VARIANTS, create_tiny_hf_model
    from moerl.warmstart import route_fragility

    path = create_tiny_hf_model(tmp_path / "m", **dict(TINY_VARIANTS["deep_moe"],
                                                      hidden_size=32, num_hidden_layers=4,
                                                      num_experts=16, num_experts_per_tok=4))
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    task = ChainArithmeticTask(max_operand=9, num_terms=3)
    prompts = task.prompts(0, 8)
    answer_tokens = sum(len(task.sft_text(p)) - len(p.ids) for p in prompts)
    same = route_fragility(model, task, prompts, dtype=torch.float32)
    assert same["tokens"] == answer_tokens and same["token_route_mismatch"] == 0.0
    assert same["route_agreement"] == 1.0
    assert same["kl"] == 0.0 and same["kl_same"] == 0.0 and math.isnan(same["kl_rerouted"])
    low = route_fragility(model, task, prompts)
    assert low["dtype"] == "bfloat16" and 0.0 < low["token_route_mismatch"] <= 1.0
    assert low["route_agreement"] < 1.0
    # The KL over all answer tokens is the token-weighted mean of its two groups' KLs.
    share = low["token_route_mismatch"]
    assert low["kl"] > 0.0 and low["kl_rerouted"] > 0.0
    assert low["kl"] == pytest.approx(share * low["kl_rerouted"] + (1 - share) * low["kl_same"],
                                      rel=1e-3)
