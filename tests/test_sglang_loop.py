"""moerl's rollout manager with a real SGLang 0.5.23 server that it starts itself
(``rollout.server: sglang``): restart on death with exactly-once delivery, and short RL runs at
TP=2/EP=2 against it, fp32 with keep-routing and keep-sampling-mask (the trainer reproduces
SGLang's log-probs and routes) and with a bf16 engine. Marked ``sglang``."""

from __future__ import annotations

import threading
import time

import pytest

from e2e_util import fast_overrides, finite, read_metrics, torchrun
from moerl.rollout import protocol as P
from moerl.rollout.client import run_sync
from sglang_util import require_sglang_python

pytestmark = pytest.mark.sglang


@pytest.fixture(scope="module")
def moe_dir(tmp_path_factory):
    from moerl.tiny_model import TINY_VARIANTS, create_tiny_hf_model

    require_sglang_python()
    return create_tiny_hf_model(tmp_path_factory.mktemp("tiny_moe"), seed=5,
                                **TINY_VARIANTS["tiny_moe"])


@pytest.mark.timeout(1800)  # two SGLang start-ups: ~1 min each idle, ~8 min on a loaded 2-core CPU
def test_killed_local_sglang_is_restarted_and_every_sample_arrives_once(moe_dir, tmp_path):
    from moerl.rollout_manager import RolloutManager, SamplingSettings

    budget = 300
    sampling = SamplingSettings(temperature=1.0, top_p=1.0, top_k=8, min_p=0.0,
                                max_new_tokens=budget, stop_token_ids=())
    manager = RolloutManager(
        builtin=False, local_sglang=True, url="", api_key="", engine_dtype="float32",
        concurrency=8, timeout_s=300.0, max_retries=8, seed=1, sampling=sampling,
        layout=P.MoeLayout.from_hf_config(moe_dir), return_routes=True, require_routes=True,
        return_mask=True, require_mask=True, sync_method="distributed", bucket_mb=8,
        sync_address="", sync_port=0, run_dir=tmp_path, hf_config_dir=str(moe_dir))
    manager.start(moe_dir, version="step-0")
    try:
        (first,) = manager.servers

        def crash():
            time.sleep(2.0)
            first.kill()

        killer = threading.Thread(target=crash)
        killer.start()
        prompts = [[1, 5, 9], [1, 7, 3, 4], [1, 30]]
        # manager.generate's own path (watchdog + client), with ignore_eos so that every
        # request is still running when the server is killed.
        samples = run_sync(manager._with_watchdog(manager.clients[0].generate(
            prompts, n=2, sampling_params={**sampling.params(), "ignore_eos": True})))
        killer.join()
        (now,) = manager.servers
        assert manager.restarts == 1 and now is not first and now.alive()
        assert [(s.group_index, s.sample_index) for s in samples] == [
            (g, j) for g in range(3) for j in range(2)]
        for s in samples:
            assert s.weight_version == "step-0"
            assert s.finish_reason == "length" and len(s.response_ids) == budget
            assert s.routes_TLK.shape[0] == len(s.prompt_ids) + budget - 1
    finally:
        manager.close()
    assert not first.alive() and not manager.servers



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
