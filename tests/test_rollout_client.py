"""The client against a server that is killed mid-batch and restarted on the same port."""

import json
import threading
import time
import urllib.request

import pytest

from moerl.rollout.client import RetryPolicy, RolloutClient, RolloutError, derive_seed
from moerl.rollout.server import launch_server
from moerl.tiny_model import create_tiny_hf_model


def model_info(handle):
    req = urllib.request.Request(handle.url + "/model_info",
                                 headers={"Authorization": f"Bearer {handle.api_key}"})
    with urllib.request.urlopen(req, timeout=10) as r:
        return json.loads(r.read())["moerl"]


def test_killed_and_restarted_server_mid_batch_yields_every_sample_once(tmp_path):
    model_dir = create_tiny_hf_model(tmp_path / "tiny")
    first = launch_server(model_dir, num_threads=1, max_batch_size=4)
    restarted = None
    try:
        client = RolloutClient(first.url, api_key=first.api_key, concurrency=2, retry=RetryPolicy(
            max_attempts=200, initial_backoff_s=0.05, max_backoff_s=0.5), timeout_s=120)
        num_groups, n = 8, 2
        result: dict = {}
        sp = {"temperature": 1.0, "top_k": 20, "max_new_tokens": 120, "ignore_eos": True}
        worker = threading.Thread(target=lambda: result.update(samples=client.generate_sync(
            [[1, g + 3, g + 5] for g in range(num_groups)], n=n, seed=11, sampling_params=sp)))
        worker.start()
        # Kill once some groups are done and others are being generated.
        deadline = time.monotonic() + 120
        while model_info(first)["num_finished"] < 2 * n:
            assert time.monotonic() < deadline and worker.is_alive()
            time.sleep(0.01)
        first.kill()
        restarted = launch_server(model_dir, port=first.port, api_key=first.api_key,
                                  num_threads=1, max_batch_size=4)
        worker.join(240)
        assert not worker.is_alive()
        served_after_restart = model_info(restarted)["num_finished"]
        samples = result["samples"]
        keys = [(s.group_index, s.sample_index) for s in samples]
        assert keys == [(g, j) for g in range(num_groups) for j in range(n)]  # each exactly once
        assert all(len(s.response_ids) == 120 and s.finish_reason == "length" for s in samples)
        assert all(s.routes_TLK.shape == (122, 3, 2) for s in samples)
        # It really was mid-batch: the restarted server produced some groups, not all.
        assert 0 < served_after_restart < num_groups * n
        # Per-sample seeds: the groups done before the kill and those redone after agree with
        # a clean run of the same seeds.
        again = RolloutClient(restarted.url, api_key=restarted.api_key).generate_sync(
            [[1, g + 3, g + 5] for g in range(num_groups)], n=n, seed=11, sampling_params=sp)
        assert [s.response_ids for s in again] == [s.response_ids for s in samples]
    finally:
        first.kill()
        if restarted is not None:
            restarted.stop()


def test_client_gives_up_with_a_clear_error_when_nobody_listens():
    client = RolloutClient("http://127.0.0.1:9", retry=RetryPolicy(
        max_attempts=2, initial_backoff_s=0.01), layout=None)
    with pytest.raises(RolloutError, match="failed after 2 attempt"):
        client.generate_sync([[1, 2]], return_routes=False, return_sampling_mask=False)


def test_client_validates_arguments_before_sending():
    client = RolloutClient("http://127.0.0.1:9")
    with pytest.raises(ValueError, match="sampling_params key 'n'"):
        client.generate_sync([[1]], sampling_params={"n": 2})
    with pytest.raises(ValueError, match="'temprature'"):
        client.generate_sync([[1]], sampling_params={"temprature": 2})
    with pytest.raises(ValueError, match="wire_format"):
        RolloutClient("http://x", wire_format="msgpack")
    assert derive_seed(1, 2, 3) == derive_seed(1, 2, 3) != derive_seed(1, 2, 4)
    assert 0 <= derive_seed(5, 0, 0) < 2**63
