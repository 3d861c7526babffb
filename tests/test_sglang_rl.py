"""Short RL runs at TP=2/EP=2 against a real SGLang 0.5.23 server that the trainer starts itself
(``rollout.server: sglang``): fp32 with keep-routing and keep-sampling-mask (the trainer reproduces
SGLang's log-probs and routes) and a bf16 engine (the mismatch is measured). Marked ``sglang``."""

from __future__ import annotations

import pytest

from e2e_util import fast_overrides, finite, read_metrics, torchrun
from sglang_util import require_sglang_python

pytestmark = pytest.mark.sglang


# Metrics every step of an RL run against SGLang must carry, finite.
RL_METRICS = ["score/mean", "loss", "grad_norm", "entropy/old", "mismatch/abs_mean",
              "mismatch/abs_max", "mismatch/k3", "mismatch/extreme_frac",
              "routing/route_agreement", "routing/token_route_mismatch", "time/weight_sync"]


def sglang_rl_run(model, out, *args):
    """Two RL steps at TP=2/EP=2 with the trainer's own local SGLang server; its metrics."""
    require_sglang_python()
    overrides = fast_overrides(model, out, **{
        "training.steps": 2, "rollout.server": "sglang",
        "rollout.top_k": 20})  # SGLang returns sampling masks only for a finite top_k
    # An SGLang start-up took 10-25 min on this 2-core machine at load average ~25-30.
    torchrun([*args, *overrides], timeout=3000)
    records = read_metrics(out)
    assert [r["step"] for r in records] == [0, 1]
    for r in records:
        missing = [k for k in RL_METRICS if not finite(r.get(k))]
        assert not missing, f"metrics missing or not finite: {missing}"
        assert r["skipped"] == 0
    print({k: [r[k] for r in records] for k in ("mismatch/abs_mean", "mismatch/abs_max",
                                                  "mismatch/k3", "routing/route_agreement")})
    return records


@pytest.mark.timeout(3600)  # with the session's warm start, if this test is the first to need it
def test_rl_against_fp32_sglang_with_keep_routing_and_mask_matches_the_trainer(warm_model,
                                                                              tmp_path):
    """SGLang fp32 and Megatron fp32 at TP=2/EP=2 are two implementations of one policy: with
    SGLang's routes replayed and its sampling support applied, the trainer's recompute of the
    behaviour log-probs equals SGLang's, and its routes are SGLang's, after a weight push too."""
    records = sglang_rl_run(warm_model, tmp_path / "run", "configs/scaling_grpo.yaml",
                            "--keep-routing", "--keep-sampling-mask")
    for r in records:
        assert r["mismatch/abs_mean"] <= 1e-5, r["mismatch/abs_mean"]
        assert r["routing/route_agreement"] == 1.0


@pytest.mark.timeout(3600)
def test_rl_against_a_bf16_sglang_engine_reports_the_mismatch(warm_model, tmp_path):
    """A bf16 SGLang engine against the fp32 trainer (GRPO, no replay): training goes on with
    finite metrics, and the mismatch is measured (an fp32 engine stays <= 1e-5, above)."""
    records = sglang_rl_run(warm_model, tmp_path / "run", "configs/grpo.yaml",
                            "--set", "rollout.engine_dtype=bfloat16")
    assert all(r["mismatch/abs_mean"] > 1e-5 for r in records)  # the engine really is bf16
