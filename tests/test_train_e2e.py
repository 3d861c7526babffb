"""End to end on CPU: every preset trains a few steps with TP=2/EP=2 across 2 processes against
the built-in rollout server; metrics are written and finite; the weights change."""

from __future__ import annotations

import subprocess

import pytest
from safetensors.torch import load_file

from e2e_util import REPO, fast_overrides, finite, read_metrics, torchrun

RL_PRESETS = ["grpo", "dapo", "gspo", "gspo_token", "dr_grpo", "cispo", "ppo", "dual_clip_ppo",
              "scaling_grpo"]
COMMON_METRICS = ["score/mean", "loss", "grad_norm", "ppo_kl", "clipfrac", "seq_clipfrac",
                  "entropy/old", "mismatch/abs_mean", "mismatch/abs_max", "mismatch/k3",
                  "mismatch/extreme_frac", "routing/route_agreement",
                  "routing/token_route_mismatch", "response_length/mean", "time/step",
                  "time/rollout", "time/update", "time/weight_sync"]


def changed_fraction(before_dir, after_dir) -> float:
    before = load_file(before_dir / "model.safetensors")
    after = load_file(after_dir / "model.safetensors")
    assert before.keys() == after.keys()
    return sum(not before[k].equal(after[k]) for k in before) / len(before)


@pytest.mark.parametrize("preset", [
    # scaling_grpo (keep routing, keep sampling mask, OPSM) is also the compat subset's RL run.
    pytest.param(p, marks=pytest.mark.compat) if p == "scaling_grpo" else p for p in RL_PRESETS])
def test_preset_trains(preset, warm_model, tmp_path):
    out = tmp_path / "run"
    torchrun([f"configs/{preset}.yaml",
              *fast_overrides(warm_model, out, **{"training.steps": 2})], timeout=420)
    records = read_metrics(out)
    assert [r["step"] for r in records] == [0, 1]
    for record in records:
        missing = [k for k in COMMON_METRICS if not finite(record.get(k))]
        assert not missing, f"{preset}: metrics missing or not finite: {missing}"
        # The fp32 engine and the fp32 trainer are two implementations of one policy.
        assert record["mismatch/abs_max"] < 1e-4, record["mismatch/abs_max"]
        assert record["skipped"] == 0
        # moerl.mechanism's split: fp32 engine, so every response token is routed identically.
        assert record["mech/tokens_same"] > 0 and record["mech/tokens_rerouted"] == 0
        assert record["mech/tokens_same"] == sum(
            record[f"mech/hist_same_b{i}"] for i in range(10)) == record["mech/tokens_dlayers0"]
        assert finite(record["mech/grad_per_token_same"]) and record["mech/grad_per_token_same"] >= 0
        assert not finite(record["mech/clipfrac_same"]) or 0 <= record["mech/clipfrac_same"] <= 1
    if preset in ("ppo", "dual_clip_ppo"):
        assert all(finite(r["critic/loss"]) for r in records)
    if preset == "scaling_grpo":
        assert all(finite(r["opsm_masked_frac"]) for r in records)
        assert all(r["routing/route_agreement"] == 1.0 for r in records)  # fp32: same routes
    assert changed_fraction(warm_model, out / "hf") > 0.5
    assert (out / "checkpoints" / "step_000002" / "meta.json").exists()


def test_ppo_ptx_trains(warm_model, tmp_path):
    """PPO-ptx: a language-model loss on pretraining text joins every optimizer step."""
    import json

    from moerl.tasks.arithmetic import ArithmeticTask

    ptx = tmp_path / "pretrain.jsonl"
    task = ArithmeticTask(max_operand=30, seed=99)
    ptx.write_text("".join(json.dumps({"text": p.text + p.answer}) + "\n"
                           for p in task.prompts(0, 64)))
    out = tmp_path / "run"
    torchrun(["configs/ppo.yaml", *fast_overrides(
        warm_model, out, **{"training.steps": 2, "algorithm.ptx_coef": 0.5,
                            "algorithm.ptx_path": ptx})], timeout=420)
    records = read_metrics(out)
    assert all(finite(r["ptx_loss"]) and r["ptx_loss"] > 0 for r in records)
    assert all(finite(r["critic/loss"]) for r in records)


def test_dpo_trains(warm_model, tmp_path):
    from moerl.dpo import make_arithmetic_pairs

    pairs = tmp_path / "pairs.jsonl"
    make_arithmetic_pairs(pairs, count=96, max_operand=30, seed=3)
    out = tmp_path / "run"
    torchrun(["configs/dpo.yaml", *fast_overrides(
        warm_model, out, **{"training.steps": 3, "task.path": pairs, "task.eval_size": 16,
                            "training.eval_every": 3, "rollout.prompts_per_step": 8})],
             timeout=420)
    records = read_metrics(out)
    assert [r["step"] for r in records] == [0, 1, 2]
    assert all(finite(r["dpo/loss"]) and finite(r["grad_norm"]) for r in records)
    assert 0.0 <= records[-1]["eval/reward_accuracy"] <= 1.0
    assert changed_fraction(warm_model, out / "hf") > 0.5


def test_launch_local_script(warm_model, tmp_path):
    """The README's main-job entry point: validates, picks the process count, trains."""
    out = tmp_path / "run"
    proc = subprocess.run(
        ["launch/local.sh", "configs/grpo.yaml",
         *fast_overrides(warm_model, out, **{"training.steps": 1})],
        cwd=REPO, capture_output=True, text=True, timeout=420)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert [r["step"] for r in read_metrics(out)] == [0]
