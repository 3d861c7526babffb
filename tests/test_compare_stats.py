"""tools/compare_stats.py: paired intervals against textbook values, and the collapse rule."""

import math
import statistics
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tools"))

from compare_stats import paired_difference, steps_to_collapse, t_quantile  # noqa: E402


@pytest.mark.parametrize("df, expected", [(1, 12.706205), (2, 4.302653), (4, 2.776445),
                                          (9, 2.262157), (30, 2.042272)])
def test_t_quantile_matches_tables(df, expected):
    assert t_quantile(0.975, df) == pytest.approx(expected, abs=2e-5)


def test_paired_difference_uses_the_per_seed_differences():
    # Large between-seed spread, constant within-seed gap: the unpaired view sees nothing, the
    # paired one sees a certain +0.1 (sd of the differences is ~0).
    a, b = [0.30, 0.60, 0.90], [0.20, 0.50, 0.80]
    d = paired_difference(a, b)
    assert d["mean"] == pytest.approx(0.1) and d["n"] == 3 and d["significant"] == 1.0
    assert d["t_low"] == pytest.approx(0.1, abs=1e-9) and d["boot_high"] == pytest.approx(0.1)
    # Hand-computed: diffs 0.1, -0.1, 0.3: mean 0.1, sd 0.2, half width 4.302653 * 0.2 / sqrt 3.
    d = paired_difference([0.4, 0.5, 0.9], [0.3, 0.6, 0.6])
    half = 4.302653 * 0.2 / math.sqrt(3)
    assert d["t_low"] == pytest.approx(0.1 - half, abs=1e-5)
    assert d["t_high"] == pytest.approx(0.1 + half, abs=1e-5)
    assert d["significant"] == 0.0
    assert min([0.1, -0.1, 0.3]) <= d["boot_low"] < d["mean"] < d["boot_high"] <= 0.3 + 1e-9
    # Order matters (pairing by seed), and a NaN seed drops out of both arms.
    assert paired_difference([0.9, 0.5, 0.4], [0.3, 0.6, 0.6])["mean"] == pytest.approx(
        statistics.fmean([0.6, -0.1, -0.2]))
    d = paired_difference([0.4, math.nan, 0.9], [0.3, 0.6, 0.6])
    assert d["n"] == 2 and d["mean"] == pytest.approx(0.2)
    assert math.isnan(paired_difference([1.0], [0.0])["t_low"])
    with pytest.raises(ValueError, match="one value per seed"):
        paired_difference([1.0, 2.0], [1.0])


def _run(accuracies, grad_norms=()):
    records = [{"step": s, "eval/accuracy": a} for s, a in accuracies]
    return records + [{"step": s, "grad_norm": g} for s, g in grad_norms]


def test_collapse_rule_needs_a_sustained_drop_below_half_the_start():
    assert steps_to_collapse(_run([(0, 0.4), (10, 0.3), (20, 0.25)])) is None
    assert steps_to_collapse(_run([(0, 0.4), (10, 0.1), (20, 0.3)])) is None  # recovered
    assert steps_to_collapse(_run([(0, 0.4), (10, 0.3), (20, 0.1), (30, 0.05)])) == 20
    assert steps_to_collapse(_run([(0, 0.4), (10, 0.1), (20, 0.3), (30, 0.19)])) == 30
    # A run whose gradients stop being finite collapsed where they stopped.
    grads = [(0, 0.5), (1, 0.7), (2, "nan"), (3, "inf")]
    assert steps_to_collapse(_run([(0, 0.4), (4, 0.4)], grads)) == 2
    assert steps_to_collapse(_run([(0, 0.4)], [(0, "nan"), (1, 0.3)])) is None


def test_compare_pools_mechanism_metrics_token_weighted():
    import compare

    def record(step, same, rerouted, abs_same, abs_rerouted, k3):
        r = {"step": step, "mech/tokens_same": same, "mech/tokens_rerouted": rerouted,
             "mech/abs_logratio_same": abs_same, "mech/abs_logratio_rerouted": abs_rerouted,
             "mech/tokens_dlayers0": same, "mech/tokens_dlayers1": rerouted,
             "mech/k3_dlayers0": k3[0], "mech/k3_dlayers1": k3[1]}
        r.update({f"mech/hist_same_b{i}": float(i == 2) * same for i in range(10)})
        r.update({f"mech/hist_rerouted_b{i}": float(i == 7) * rerouted for i in range(10)})
        return r

    pooled = compare.mechanism_of([record(0, 30, 10, 1e-3, 0.2, (1e-6, "nan")),
                                   record(1, 10, 30, 3e-3, 0.4, (3e-6, 0.05)),
                                   {"step": 2, "score/mean": 0.5}])  # a record without mech/
    assert pooled["hist"]["same"][2] == 40 and pooled["hist"]["rerouted"][7] == 40
    assert pooled["abs_logratio"]["same"] == pytest.approx((30 * 1e-3 + 10 * 3e-3) / 40)
    assert pooled["abs_logratio"]["rerouted"] == pytest.approx((10 * 0.2 + 30 * 0.4) / 40)
    assert pooled["tokens_by_dlayers"] == {0: 40, 1: 40}
    assert pooled["k3_by_dlayers"][0] == pytest.approx((30 * 1e-6 + 10 * 3e-6) / 40)
    assert pooled["k3_by_dlayers"][1] == pytest.approx(0.05)  # the NaN step carries no weight


def test_grad_spikes_are_judged_against_steps_with_a_gradient():
    """A run that stopped learning (all-equal group rewards: gradient norm 0 on most steps) does
    not count every step with a gradient as a spike; a real outlier still counts."""
    import compare

    def run(grads):
        return [{"step": i, "score/mean": 0.0, "grad_norm": g} for i, g in enumerate(grads)]

    dead = run([0.8, 0.0, 0.0, 0.3, 0.0, 0.0, 0.0, 0.2, 0.0])
    assert compare.run_stats(dead)["grad_spikes"] == 0.0
    spiky = run([1.0, 0.9, 1.1, 0.0, 6.0, 1.0, "nan"])
    assert compare.run_stats(spiky)["grad_spikes"] == 1.0


def test_mechanism_figure_leaves_out_depths_with_few_tokens():
    """The k3-vs-depth panel plots a depth only with MIN_DEPTH_TOKENS tokens behind it (in the full
    run 6+ rerouted layers held a few dozen tokens and k3 values from 1e-16 to 1e-2), for the
    int keys of mechanism_of and the str keys read back from summary.json alike."""
    import compare

    n = compare.MIN_DEPTH_TOKENS
    entry = {"tokens_by_dlayers": {0: 10 * n, 1: n, 2: n - 1, 10: 5, 3: 2 * n}}
    assert compare.plotted_depths(entry) == [0, 1, 3]
    as_json = {"tokens_by_dlayers": {str(d): v for d, v in entry["tokens_by_dlayers"].items()}}
    assert compare.plotted_depths(as_json) == ["0", "1", "3"]


def test_deep_moe24_is_deep_moe_with_24_layers_and_its_own_warm_start(tmp_path):
    """--variant deep_moe24: the 12-layer model's shape at twice the depth, all MoE (SGLang can
    serve it), warm-started into a cache entry of its own (never the 12-layer checkpoint)."""
    import json

    import compare
    from moerl.tiny_model import TINY_VARIANTS, create_tiny_hf_model

    configs = [json.loads((create_tiny_hf_model(tmp_path / v, **TINY_VARIANTS[v])
                           / "config.json").read_text()) for v in ("deep_moe", "deep_moe24")]
    assert {k for k in configs[0].keys() | configs[1].keys()
            if configs[0].get(k) != configs[1].get(k)} == {"num_hidden_layers"}
    assert configs[1]["num_hidden_layers"] == 24 and configs[1]["mlp_only_layers"] == []
    paths = {compare.warm_start_path(mode, variant) for mode in (compare.FULL, compare.QUICK)
             for variant in compare.VARIANTS}
    assert len(paths) == 2 * len(compare.VARIANTS)
    with pytest.raises(SystemExit):
        compare.main(["--variant", "deep_moe48", "--out", str(tmp_path / "out")])


def test_the_default_model_is_deep_moe128_twice_the_experts_and_top_k_of_deep_moe(tmp_path):
    """The full comparison's model (the first of VARIANTS, --variant's default): deep_moe's 12 MoE
    layers with 128 experts (Qwen3-30B-A3B's count) and top-16, all MoE so SGLang serves it."""
    import json

    import compare
    from moerl.tiny_model import TINY_VARIANTS, create_tiny_hf_model

    assert compare.VARIANTS[0] == "deep_moe128"
    configs = [json.loads((create_tiny_hf_model(tmp_path / v, **TINY_VARIANTS[v])
                           / "config.json").read_text()) for v in ("deep_moe", "deep_moe128")]
    differ = {k for k in configs[0].keys() | configs[1].keys()
              if configs[0].get(k) != configs[1].get(k)}
    experts_key = "num_local_experts" if "num_local_experts" in configs[1] else "num_experts"
    assert differ == {experts_key, "num_experts_per_tok"}
    assert (configs[1][experts_key], configs[1]["num_experts_per_tok"]) == (128, 16)
    assert configs[1]["num_hidden_layers"] == 12 and configs[1]["mlp_only_layers"] == []


def test_an_out_directory_of_another_setting_is_refused_before_any_run(tmp_path):
    """--quick then the full mode into one --out would skip the quick mode's 3-step runs as done
    (and resume unfinished ones from the wrong checkpoints): the second setting is refused, with
    what differs; the same setting (more arms or seeds) resumes."""
    import compare

    quick = {"model": tmp_path / "m", "engine": "builtin", "steps": 3, "eval_every": 3,
             "task": compare.TASK, "settings": compare.MISMATCH_SETTINGS}
    compare.check_setting(tmp_path, quick)
    compare.check_setting(tmp_path, dict(quick))  # resuming the same setting
    with pytest.raises(SystemExit, match=r"steps: 3 there, 50 now.*new --out"):
        compare.check_setting(tmp_path, {**quick, "steps": 50, "eval_every": 3})
    with pytest.raises(SystemExit, match="engine: 'builtin' there, 'sglang' now"):
        compare.check_setting(tmp_path, {**quick, "engine": "sglang"})
