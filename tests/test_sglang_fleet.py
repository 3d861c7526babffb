"""moerl's rollout manager over a fleet of two real SGLang 0.5.23 servers (external ones, as on a
cluster): groups spread over both, one weight push reaches both (versions checked on each), and a
server killed mid-step loses no sample. Marked ``sglang``; two SGLang start-ups (~2 GB and a busy
core each while up), so everything is checked in one test."""

from __future__ import annotations

import concurrent.futures
import threading
import time

import pytest

from moerl.rollout import protocol as P
from sglang_util import freeze, require_sglang_python

pytestmark = pytest.mark.sglang

KEY = "sglang-fleet-test"
GROUPS, N = 6, 2


@pytest.fixture(scope="module")
def moe_dir(tmp_path_factory):
    from moerl.tiny_model import TINY_VARIANTS, create_tiny_hf_model

    require_sglang_python()
    return create_tiny_hf_model(tmp_path_factory.mktemp("tiny_moe"), seed=7,
                                **TINY_VARIANTS["tiny_moe"])


def _manager(urls, moe_dir, run_dir):
    from moerl.rollout_manager import RolloutManager, SamplingSettings

    sampling = SamplingSettings(temperature=1.0, top_p=1.0, top_k=8, min_p=0.0,
                                max_new_tokens=48, stop_token_ids=())
    return RolloutManager(
        builtin=False, urls=tuple(urls), url="", api_key=KEY, engine_dtype="float32",
        concurrency=8, timeout_s=300.0, max_retries=2, seed=3, sampling=sampling,
        layout=P.MoeLayout.from_hf_config(moe_dir), return_routes=True, require_routes=True,
        return_mask=True, require_mask=True, sync_method="distributed", bucket_mb=8,
        sync_address="127.0.0.1", sync_port=0, run_dir=run_dir, hf_config_dir=str(moe_dir))


def _keys(samples):
    return [(s.group_index, s.sample_index) for s in samples]


@pytest.mark.timeout(2400)  # two SGLang start-ups: ~1 min each idle, several on a loaded CPU
def test_sglang_fleet_spreads_pushes_to_both_and_a_killed_server_loses_no_sample(moe_dir,
                                                                                  tmp_path):
    from safetensors.torch import load_file

    from moerl.rollout.sglang_local import launch_sglang
    from moerl.tiny_model import TINY_VARIANTS, create_tiny_hf_model

    servers = []
    manager = None
    try:
        with concurrent.futures.ThreadPoolExecutor(2) as pool:  # the two start-ups overlap
            starts = [pool.submit(launch_sglang, moe_dir, api_key=KEY) for _ in range(2)]
        servers = [start.result() for start in starts if start.exception() is None]
        for start in starts:
            start.result()  # a failed start-up raises here; the finally stops the other
        manager = _manager([s.url for s in servers], moe_dir, tmp_path)
        manager.start(moe_dir, version="")
        other = create_tiny_hf_model(tmp_path / "other", seed=11, **TINY_VARIANTS["tiny_moe"])
        manager.push_weights(load_file(other / "model.safetensors").items(), version="step-1")
        prompts = [[1, 3 + g, 9, 4 + g] for g in range(GROUPS)]

        samples = manager.generate(prompts, n=N, step=1)  # raises unless every server is at step-1
        assert _keys(samples) == [(g, j) for g in range(GROUPS) for j in range(N)]
        assert all(manager.fleet.groups_served), manager.fleet.groups_served  # both served
        assert {s.weight_version for s in samples} == {"step-1"}

        def kill_when_busy():
            deadline = time.monotonic() + 300
            while manager.fleet.outstanding[1] == 0 and time.monotonic() < deadline:
                time.sleep(0.01)
            time.sleep(0.5)  # its requests reach the frozen server
            servers[1].kill()

        # Frozen first, so that the groups sent to it are still pending when it is killed,
        # however fast the machine generates (in CI its groups once finished before the kill).
        freeze(servers[1])
        served = list(manager.fleet.groups_served)
        killer = threading.Thread(target=kill_when_busy)
        killer.start()
        samples = manager.generate(prompts, n=N, step=2)
        killer.join()
        assert not manager.fleet.up[1]  # it failed groups mid-step, which went to the other
        # every group of the step was served by the live server, none by the killed one
        assert [now - then for now, then in zip(manager.fleet.groups_served, served)] == [GROUPS, 0]
        assert _keys(samples) == [(g, j) for g in range(GROUPS) for j in range(N)]  # all, once
        assert all(s.routes_TLK is not None and s.mask_offsets_R1 is not None for s in samples)
    finally:
        if manager is not None:
            manager.close()
        for server in servers:
            server.stop()
