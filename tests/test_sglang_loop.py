"""moerl's rollout manager with a real SGLang 0.5.23 server that it starts itself
(``rollout.server: sglang``): restart on death with exactly-once delivery. The RL runs against
such a server are in ``test_sglang_rl.py`` (a file of their own, so that tools/test.sh's two
pytest workers share the SGLang start-ups evenly). Marked ``sglang``."""

from __future__ import annotations

import threading
import time

import pytest

from moerl.rollout import protocol as P
from moerl.rollout.client import run_sync
from sglang_util import freeze, require_sglang_python

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
            time.sleep(2.0)  # the requests reach the frozen server
            first.kill()

        # Frozen first, so that no request can finish before the kill, however fast the machine
        # generates (in CI 300 tokens once took under 2 s and the kill found nothing running).
        freeze(first)
        killer = threading.Thread(target=crash)
        killer.start()
        prompts = [[1, 5, 9], [1, 7, 3, 4], [1, 30]]
        # manager.generate's own path (watchdog + client); ignore_eos: every sample of the
        # restarted server runs to the budget.
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
