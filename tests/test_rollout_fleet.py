"""A rollout fleet of built-in servers: groups spread by least outstanding work, samples equal to a
single server's for the same seeds, a server killed mid-step loses no group."""

from __future__ import annotations

import asyncio
import threading
import time

import pytest
import torch

from moerl.rollout.client import RetryPolicy, RolloutClient, run_sync
from moerl.rollout.fleet import Fleet, NoServerLeft
from moerl.rollout.server import launch_server

N, GROUPS, MAX_NEW = 3, 12, 6
SAMPLING = {"temperature": 1.0, "top_k": 8, "max_new_tokens": MAX_NEW}
API_KEY = "fleet-test"


@pytest.fixture(scope="module")
def servers(model_dir):
    # One sequence at a time: each request's output is a pure function of weights, prompt, seed.
    handles = [launch_server(model_dir, num_threads=1, max_batch_size=1, api_key=API_KEY)
               for _ in range(3)]
    yield handles
    for handle in handles:
        handle.stop()


def _clients(handles, **kwargs):
    return [RolloutClient(h.url, api_key=h.api_key, concurrency=4,
                          retry=RetryPolicy(max_attempts=2, initial_backoff_s=0.05), **kwargs)
            for h in handles]


def _prompts():
    gen = torch.Generator().manual_seed(3)
    return [torch.randint(1, 60, (3 + g % 4,), generator=gen).tolist() for g in range(GROUPS)]


def _generate(fleet: Fleet):
    return run_sync(fleet.generate(_prompts(), n=N, sampling_params=SAMPLING,
                                   max_new_tokens=MAX_NEW, seed=1234, group_index_offset=100))


def _key(samples):
    return [(s.group_index, s.sample_index, s.response_ids, s.routes_TLK.tolist(),
             s.mask_ids_M.tolist(), s.mask_offsets_R1.tolist()) for s in samples]


@pytest.fixture(scope="module")
def single(servers):
    return _key(_generate(Fleet(_clients(servers[:1]))))


@pytest.mark.parametrize("num_servers", [2, 3])
def test_fleet_spreads_groups_and_matches_a_single_server(servers, single, num_servers):
    fleet = Fleet(_clients(servers[:num_servers]))
    samples = _generate(fleet)
    assert _key(samples) == single  # routes and masks too, sample for sample
    assert sum(fleet.groups_served) == GROUPS and all(fleet.groups_served), fleet.groups_served
    assert fleet.outstanding == [0] * num_servers


def test_least_outstanding_work_picks_the_idlest_server(servers):
    fleet = Fleet(_clients(servers[:3]))
    fleet.outstanding = [30, 10, 10]
    assert fleet._pick() == 1
    fleet.up[1] = False
    assert fleet._pick() == 2


def test_a_server_killed_mid_step_loses_no_group(model_dir, single):
    handles = [launch_server(model_dir, num_threads=1, max_batch_size=1) for _ in range(2)]
    try:
        downs = []
        fleet = Fleet(_clients(handles), on_down=lambda i, why: downs.append(i))
        result = {}
        worker = threading.Thread(target=lambda: result.update(samples=_generate(fleet)))
        worker.start()
        deadline = time.monotonic() + 120
        while fleet.groups_served[1] == 0 and time.monotonic() < deadline:
            time.sleep(0.01)
        handles[1].kill()
        worker.join(timeout=300)
        assert not worker.is_alive()
        assert downs == [1] and not fleet.up[1]
        assert _key(result["samples"]) == single  # every group exactly once, same samples
        with pytest.raises(NoServerLeft, match="no rollout server is left"):
            handles[0].kill()
            _generate(fleet)
    finally:
        for handle in handles:
            handle.stop()


def test_an_external_server_killed_during_a_weight_push_is_dropped_and_rejoins(
        servers, model_dir, tmp_path, caplog):
    """Runs after the tests that sample from the module's servers (it kills two of them).
    Servers 1 and 2 as external ones; server 2 is killed once the push's first bucket has gone
    out: server 1 still takes the whole update (it serves exactly what the pushed weights
    compute), the push succeeds with server 2 dropped, which rejoins at the next push once
    relaunched; with both dead, the push fails with NoServerLeft."""
    from moerl.rollout.weights import iter_safetensors_dir
    from moerl.rollout_manager import RolloutManager, SamplingSettings
    from moerl.tiny_model import create_tiny_hf_model
    from test_rollout_weights import GREEDY, PROMPTS, assert_computes

    pair = servers[1:]
    new_dir = create_tiny_hf_model(tmp_path / "new", seed=1)
    new = list(iter_safetensors_dir(new_dir))
    sampling = SamplingSettings(temperature=1.0, top_p=1.0, top_k=8, min_p=0.0,
                                max_new_tokens=MAX_NEW, stop_token_ids=())
    manager = RolloutManager(
        builtin=False, url="", urls=tuple(h.url for h in pair), api_key=API_KEY,
        engine_dtype="float32", concurrency=4, timeout_s=60, max_retries=1, seed=7,
        sampling=sampling, layout=run_sync(_clients(pair)[0].get_layout()),
        return_routes=False, require_routes=False, return_mask=False, require_mask=False,
        sync_method="distributed", bucket_mb=1, sync_address="127.0.0.1", sync_port=0,
        run_dir=tmp_path, hf_config_dir=str(model_dir))
    manager.bucket_bytes = 64 << 10  # several buckets from the tiny model

    def killing(tensors, after: int):
        """The tensors, killing server 2 once ``after`` of them are taken (buckets before the
        current one have been broadcast by then)."""
        for k, item in enumerate(tensors):
            if k == after:
                pair[1].kill()
            yield item

    def assert_serves_new(client) -> None:
        assert_computes(client.generate_sync(PROMPTS, sampling_params=GREEDY), new_dir)

    manager.start(model_dir, version="")
    try:
        manager.push_weights(killing(new, after=len(new) // 2), version="step-1")
        assert "failed during the weight push" in caplog.text
        assert manager.fleet.up == [True, False]
        survivor = manager.clients[0]
        assert run_sync(survivor.weight_version()) == "step-1"
        assert_serves_new(survivor)
        samples = manager.generate(_prompts()[:2], n=2, step=1)
        assert {s.weight_version for s in samples} == {"step-1"}
        assert manager.fleet.groups_served == [2, 0]

        servers[2] = launch_server(model_dir, port=pair[1].port, num_threads=1,
                                   max_batch_size=1, api_key=API_KEY)  # back, at old weights
        manager.push_weights(new, version="step-2")  # brings it to the current weights
        assert manager.fleet.up == [True, True]
        assert run_sync(manager.clients[1].weight_version()) == "step-2"
        assert_serves_new(manager.clients[1])

        for handle in servers[1:]:
            handle.kill()
        with pytest.raises(NoServerLeft, match="no rollout server is left: .*weight push"):
            manager.push_weights(new, version="step-3")
    finally:
        manager.close()


@pytest.mark.timeout(300)  # the old code waited out the group's 600 s timeout here
def test_a_managed_server_killed_as_a_weight_push_starts_is_restarted_on_the_new_weights(
        model_dir, tmp_path, caplog):
    """rollout.server=builtin with one server (the default), killed while the push takes the
    tensors (the manager copies them all before it broadcasts): no server is left in the push,
    so the manager restarts it from the copy it wrote, at the new version, and the push
    succeeds."""
    from moerl.rollout.protocol import MoeLayout
    from moerl.rollout.weights import iter_safetensors_dir
    from moerl.rollout_manager import RolloutManager, SamplingSettings
    from moerl.tiny_model import create_tiny_hf_model
    from test_rollout_weights import GREEDY, PROMPTS, assert_computes

    new_dir = create_tiny_hf_model(tmp_path / "new", seed=1)
    new = list(iter_safetensors_dir(new_dir))
    manager = RolloutManager(
        builtin=True, url="", api_key="", engine_dtype="float32", concurrency=4, timeout_s=60,
        max_retries=1, seed=7, sampling=SamplingSettings(1.0, 1.0, 8, 0.0, MAX_NEW, ()),
        layout=MoeLayout.from_hf_config(model_dir), return_routes=False, require_routes=False,
        return_mask=False, require_mask=False, sync_method="distributed", bucket_mb=1,
        sync_address="127.0.0.1", sync_port=0, run_dir=tmp_path, hf_config_dir=str(model_dir))
    manager.bucket_bytes = 64 << 10  # several buckets from the tiny model
    manager.start(model_dir, version="start")
    try:
        def killing():
            for k, item in enumerate(new):
                if k == len(new) // 2:
                    manager.servers[0].kill()
                yield item

        manager.push_weights(killing(), version="step-1")
        assert manager.restarts == 1 and "failed during the weight push" in caplog.text
        client = manager.clients[0]
        assert run_sync(client.weight_version()) == "step-1"
        assert_computes(client.generate_sync(PROMPTS, sampling_params=GREEDY), new_dir)
    finally:
        manager.close()


@pytest.mark.parametrize("overrides,message", [
    (["rollout.server=external"], "needs rollout.url"),
    (["rollout.server=external", "rollout.url=http://a:1", "rollout.urls=http://b:1"],
     "not both"),
    (["rollout.urls=http://a:1,http://b:1"], "set rollout.server=external"),
    (["rollout.num_servers=0"], "must be >= 1"),
    (["rollout.server=external", "rollout.urls=http://a:1", "rollout.num_servers=2"],
     "list them in rollout.urls"),
])
def test_fleet_config_mistakes_are_named(overrides, message):
    from moerl.config import ConfigError, load_config

    with pytest.raises(ConfigError, match=message):
        load_config([], overrides)


@pytest.mark.slow
@pytest.mark.parametrize("where", ["builtin", "external"])
def test_training_against_a_fleet_of_two_servers(where, warm_model, tmp_path):
    """Two steps with keep-routing: weights pushed to both servers in one group, versions checked
    on both, both serving groups."""
    from e2e_util import fast_overrides, finite, read_metrics, torchrun

    out = tmp_path / "run"
    extra = {"training.steps": 2, "rollout.num_servers": 2}
    handles = []
    if where == "external":
        handles = [launch_server(warm_model, num_threads=1, api_key="fleet-test")
                   for _ in range(2)]
        extra = {"training.steps": 2, "rollout.server": "external", "rollout.api_key": "fleet-test",
                 "rollout.urls": ",".join(h.url for h in handles)}
    try:
        torchrun(["configs/grpo.yaml", "--keep-routing",
                  *fast_overrides(warm_model, out, **extra)], timeout=600)
    finally:
        for handle in handles:
            handle.stop()
    records = read_metrics(out)
    assert [r["step"] for r in records] == [0, 1]
    assert all(r["rollout/servers_up"] == 2 and finite(r["loss"]) for r in records)
    if where == "builtin":
        assert (out / "rollout_server.log").exists() and (out / "rollout_server_1.log").exists()
