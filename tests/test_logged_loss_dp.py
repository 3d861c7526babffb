"""The logged losses are the true losses at any data-parallel size (issue 10, review item 3).

Each rank sums its share of a loss whose denominators are global; the metrics used to be averaged
over ranks, so ``loss``, ``ptx_loss``, ``critic/loss`` and ``dpo/loss`` read 1/DP of the truth.
The same first step (same weights, same rollout batch, one mini-batch: nothing has been updated
yet) runs with one process and with two data-parallel ranks (TP=1, EP=1, gloo); the losses must
agree up to summation order.
"""

from __future__ import annotations

import json

import pytest

from e2e_util import fast_overrides, read_metrics, torchrun

DP_SETTINGS = {"parallel.tp": 1, "parallel.ep": 1, "training.steps": 1,
               "training.mini_batches": 1, "rollout.engine_max_batch_size": 1}
REL_TOL = 1e-4


def _first_step(preset: str, model_dir, out, nproc: int, **extra) -> dict:
    """Metrics of step 0 of ``preset`` run with ``nproc`` data-parallel ranks."""
    torchrun([f"configs/{preset}.yaml", *fast_overrides(model_dir, out, **DP_SETTINGS, **extra)],
             nproc=nproc, timeout=420)
    return read_metrics(out)[0]


@pytest.mark.timeout(900)
def test_ppo_ptx_losses_do_not_depend_on_dp(warm_model, tmp_path):
    from moerl.tasks.arithmetic import ArithmeticTask

    ptx = tmp_path / "pretrain.jsonl"
    task = ArithmeticTask(max_operand=30, seed=99)
    ptx.write_text("".join(json.dumps({"text": p.text + p.answer}) + "\n"
                           for p in task.prompts(0, 64)))
    records = {}
    for nproc in (1, 2):
        records[nproc] = _first_step("ppo", warm_model, tmp_path / f"dp{nproc}", nproc,
                                     **{"algorithm.ptx_coef": 0.5, "algorithm.ptx_path": ptx})
    assert records[2]["rollout/num_samples"] == records[1]["rollout/num_samples"]
    for key in ("loss", "ptx_loss", "critic/loss"):
        one, two = records[1][key], records[2][key]
        assert one != 0.0, key
        assert two == pytest.approx(one, rel=REL_TOL), (key, one, two)


@pytest.mark.timeout(600)
def test_dpo_loss_does_not_depend_on_dp(warm_model, tmp_path):
    from moerl.dpo import make_arithmetic_pairs

    pairs = tmp_path / "pairs.jsonl"
    make_arithmetic_pairs(pairs, count=48, max_operand=30, seed=3)
    losses = {}
    for nproc in (1, 2):
        losses[nproc] = _first_step("dpo", warm_model, tmp_path / f"dp{nproc}", nproc,
                                    **{"task.path": pairs, "task.eval_size": 16,
                                       "rollout.prompts_per_step": 8})["dpo/loss"]
    # Step 0 starts at the reference: every implicit reward is 0 and the loss is log 2.
    assert losses[1] == pytest.approx(0.6931472, rel=1e-5)
    assert losses[2] == pytest.approx(losses[1], rel=REL_TOL)
