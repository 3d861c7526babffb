"""tools/plan.py against published figures: Qwen3-30B-A3B's parameter counts (model card:
30.5B total, 3.3B activated) and Megatron's per-parameter training-state costs (distributed
optimizer docs: 18 B/param for bf16 params with fp32 grads, 6 + 12/d with the distributed
optimizer; 16 and 8 + 8/d in fp32)."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tools"))

import plan  # noqa: E402

from moerl.trainer.model import architecture_from_hf  # noqa: E402

QWEN3_30B = REPO / "configs" / "models" / "qwen3_30b_a3b.hf_config.json"


@pytest.fixture(scope="module")
def arch():
    return architecture_from_hf(json.loads(QWEN3_30B.read_text()))


def test_parameter_counts_match_model_card(arch):
    total = sum(plan.parameter_counts(arch).values())
    assert total == pytest.approx(30.5e9, rel=0.01)
    assert plan.active_parameters(arch) == pytest.approx(3.3e9, rel=0.03)


@pytest.mark.parametrize("bf16, plain, dist_fixed, dist_sharded", [
    (True, 18.0, 6.0, 12.0), (False, 16.0, 8.0, 8.0)])
def test_bytes_per_param_match_megatron(arch, bf16, plain, dist_fixed, dist_sharded):
    common = dict(tp=1, ep=1, etp=1, world=8, bf16=bf16, micro_batch=1, seq_len=128,
                  recompute=True)
    m = plan.memory_per_gpu(arch, distributed_optimizer=False, **common)
    assert m["bytes_per_param_train_state"] == pytest.approx(plain)
    m = plan.memory_per_gpu(arch, distributed_optimizer=True, **common)
    assert m["bytes_per_param_train_state"] == pytest.approx(dist_fixed + dist_sharded / 8)


def test_sharding_divides_per_gpu_parameters(arch):
    dense1, expert1 = plan.per_gpu_parameters(arch, tp=1, ep=1, etp=1)
    dense4, expert8 = plan.per_gpu_parameters(arch, tp=4, ep=8, etp=1)
    assert expert8 * 8 == pytest.approx(expert1, rel=1e-9)
    assert dense1 / 4 < dense4 < dense1 / 3.5  # norms and routers stay replicated


def test_cli_reports_fit_and_payload():
    proc = subprocess.run(
        [sys.executable, "tools/plan.py", "configs/grpo.yaml",
         "configs/models/qwen3_30b_a3b_2x8.yaml", "--hf-config", str(QWEN3_30B), "--world",
         "16", "--json"], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    report = json.loads(proc.stdout)
    assert report["layout"]["dp"] == 4 and report["layout"]["expert_dp"] == 2
    assert report["fits"] is True
    payload = report["rollout_payload_per_step"]
    # int32 routes for 48 layers x top-8: 1536 raw bytes per token, base64 on the wire.
    assert payload["route_bytes_per_token_wire"] == pytest.approx(2048)
    assert payload["routes_information_MiB"] < payload["routes_host_MiB"]


@pytest.mark.parametrize("config, total, active, rel_active", [
    ("deepseek_v3", 671e9, 37e9, 0.03),       # model card: 671B total, 37B activated
    ("moonlight_16b_a3b", 16e9, 3e9, 0.05),   # model card: 16B total, 3B activated
])
def test_deepseek_v3_family_counts_match_model_cards(config, total, active, rel_active):
    arch = architecture_from_hf(json.loads(
        (REPO / "configs" / "models" / f"{config}.hf_config.json").read_text()))
    assert arch.mla is not None and arch.router.score == "sigmoid"
    assert sum(plan.parameter_counts(arch).values()) == pytest.approx(total, rel=0.01)
    assert plan.active_parameters(arch) == pytest.approx(active, rel=rel_active)


def test_route_payload_at_256_experts_and_the_smallest_host_type():
    arch = architecture_from_hf(json.loads(
        (REPO / "configs" / "models" / "deepseek_v3.hf_config.json").read_text()))
    payload = plan.rollout_payload(arch, samples=2, prompt_len=10, response_len=11, kept_ids=4)
    # 61 layers x top-8, int32 on SGLang's wire (base64), 1 byte per id on the host at 256 experts.
    assert payload["route_bytes_per_token_wire"] == pytest.approx(61 * 8 * 4 * 4 / 3)
    assert payload["route_id_bytes_smallest"] == 1
    assert payload["routes_host_smallest_MiB"] == pytest.approx(payload["routes_host_MiB"] / 4)
    assert [plan.smallest_id_bytes(e) for e in (8, 256, 257, 65536, 65537)] == [1, 1, 2, 2, 4]


def test_run_cost_counts_the_forwards_and_the_decode_time(arch):
    """One step by hand: Qwen3-30B-A3B, 8 samples of 100 + 300 tokens, pi_old + reference +
    2 epochs of forward/backward with recompute = 1 + 1 + 2 * 4 = 10 forwards."""
    common = dict(samples=8, prompt_len=100, mean_response_len=300, steps=50, epochs=2,
                  world=16, rollout_gpus=8, gpu_tflops=1000.0, train_mfu=0.5,
                  rollout_tokens_per_gpu_s=100.0)
    cost = plan.run_cost(arch, recompute=True, reference=True, **common)
    per_token = 2 * plan.active_parameters(arch) + 2 * 48 * 32 * (128 + 128) * 200
    flops = 10 * 8 * 400 * per_token
    assert cost["train_PFLOP_per_step"] == pytest.approx(flops / 1e15)
    assert cost["train_s_per_step"] == pytest.approx(flops / (16 * 1000e12 * 0.5))
    assert cost["rollout_s_per_step"] == pytest.approx(8 * 300 / (8 * 100.0))
    step = cost["train_s_per_step"] + cost["rollout_s_per_step"]
    assert cost["gpu_hours"] == pytest.approx(50 * step * (16 + 8) / 3600)
    lean = plan.run_cost(arch, recompute=False, reference=False, **common)
    assert lean["train_PFLOP_per_step"] == pytest.approx(flops / 10 * 7 / 1e15)


def test_cli_prints_the_time_and_gpu_hours_of_the_r3_preset():
    proc = subprocess.run(
        [sys.executable, "tools/plan.py", "configs/r3/grpo_r3.yaml", "--hf-config",
         str(QWEN3_30B), "--world", "16", "--mean-response-len", "8000", "--json"], cwd=REPO,
        capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    time = json.loads(proc.stdout)["time"]
    assert time["steps"] == 300 and time["gpu_hours"] > 0
    assert time["rollout_s_per_step"] == pytest.approx(256 * 8 * 8000 / (16 * 2000.0))
