"""The rollout corrections and bypass mode in the RL loop (TP=2/EP=2, 2 processes, built-in
server): the correction's whole-batch metrics are logged, bypass skips the old-log-prob pass."""

from __future__ import annotations

import pytest

from e2e_util import fast_overrides, finite, read_metrics, torchrun

CORRECTION_METRICS = ["rollout_correction/weight_mean", "rollout_correction/truncated_frac",
                      "rollout_correction/masked_frac", "rollout_correction/rejected_frac",
                      "rollout_correction/ess"]


@pytest.mark.timeout(600)
def test_self_normalised_sequence_mis_against_a_bf16_engine(warm_model, tmp_path):
    out = tmp_path / "run"
    torchrun(["configs/grpo_seq_mis.yaml", *fast_overrides(
        warm_model, out, **{"training.steps": 1, "rollout.engine_dtype": "bfloat16",
                            "algorithm.rollout_correction_self_normalize": "true"})],
             timeout=420)
    (record,) = read_metrics(out)
    assert all(finite(record.get(k)) for k in CORRECTION_METRICS), record
    assert record["mismatch/abs_max"] > 0  # bf16 engine against the fp32 trainer
    assert 0 < record["rollout_correction/ess"] <= 1
    assert finite(record["loss"]) and record["skipped"] == 0


@pytest.mark.timeout(600)
def test_bypass_mode_trains_without_the_old_logprob_pass(warm_model, tmp_path):
    out = tmp_path / "run"
    torchrun(["configs/grpo_bypass.yaml", *fast_overrides(warm_model, out,
                                                          **{"training.steps": 2})], timeout=420)
    records = read_metrics(out)
    assert [r["step"] for r in records] == [0, 1]
    for record in records:
        assert "entropy/old" not in record and "mismatch/abs_mean" not in record
        assert finite(record["loss"]) and finite(record["grad_norm"]) and record["skipped"] == 0
        # pi_old is the engine's: before the first update of a step the ratio is exactly 1.
        assert finite(record["ppo_kl"])
