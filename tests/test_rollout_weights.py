"""Weight updates on a real server subprocess: the distributed push (gloo) and the disk path."""

import json
import subprocess
import sys
import textwrap
import urllib.error
import urllib.request

import pytest
import torch

from moerl.rollout.client import RolloutClient, RolloutError, run_sync
from moerl.rollout.server import launch_server
from moerl.rollout.weight_sync import (
    DistributedWeightSync,
    WeightSyncError,
    iter_buckets,
    update_weights_from_disk,
)
from moerl.rollout.weights import iter_safetensors_dir
from moerl.tiny_model import create_tiny_hf_model

PROMPTS = [[1, 5, 9, 13], [1, 7], [1, 20, 21, 22]]
GREEDY = {"temperature": 0.0, "max_new_tokens": 12}


@pytest.fixture(scope="module")
def dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("w")
    return create_tiny_hf_model(root / "a", seed=0), create_tiny_hf_model(root / "b", seed=1)


@pytest.fixture(scope="module")
def server(dirs):
    handle = launch_server(dirs[0], num_threads=1)
    yield handle
    handle.stop()


@pytest.fixture
def client(server):
    return RolloutClient(server.url, api_key=server.api_key)


def hf_greedy_logprobs(model_dir, samples):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    out = []
    for s in samples:
        with torch.no_grad():
            logits = model(input_ids=torch.tensor([s.prompt_ids + s.response_ids])).logits[0]
        P = len(s.prompt_ids)
        lp = torch.log_softmax(logits[P - 1:-1].float(), -1)
        out.append(lp.gather(1, torch.tensor(s.response_ids)[:, None]).squeeze(1))
    return out


def assert_computes(samples, model_dir) -> None:
    """The samples' log-probs are what ``model_dir`` computes (HF transformers, fp32)."""
    for s, ref in zip(samples, hf_greedy_logprobs(model_dir, samples)):
        assert torch.allclose(s.full_logprobs_R, ref, atol=1e-5)


def test_distributed_push_changes_outputs_and_bumps_the_version(client, dirs):
    before = client.generate_sync(PROMPTS, sampling_params=GREEDY)
    assert {s.weight_version for s in before} == {"default"}
    sync = DistributedWeightSync([client], timeout_s=60)
    sync.init()
    try:
        stats = sync.push(iter_safetensors_dir(dirs[1]), weight_version="step-1",
                          bucket_bytes=100_000)  # several flattened buckets
        assert stats["num_buckets"] > 3 and stats["num_tensors"] == 80
        after = client.generate_sync(PROMPTS, sampling_params=GREEDY)
        assert {s.weight_version for s in after} == {"step-1"}
        assert run_sync(client.weight_version()) == "step-1"
        assert [s.response_ids for s in after] != [s.response_ids for s in before]
        assert_computes(after, dirs[1])  # the server now computes exactly what model B does
        # Back to A, one tensor per broadcast this time (no flattening).
        sync.push(iter_safetensors_dir(dirs[0]), weight_version="step-2", flattened=False)
        back = client.generate_sync(PROMPTS, sampling_params=GREEDY)
        assert [s.response_ids for s in back] == [s.response_ids for s in before]
        assert {s.weight_version for s in back} == {"step-2"}
    finally:
        sync.close()


def test_disk_update_changes_outputs_and_version(client, dirs, tmp_path):
    before = client.generate_sync(PROMPTS, sampling_params=GREEDY)
    path = update_weights_from_disk([client], iter_safetensors_dir(dirs[1]),
                                    out_dir=tmp_path / "push", weight_version="disk-1")
    after = client.generate_sync(PROMPTS, sampling_params=GREEDY)
    assert {s.weight_version for s in after} == {"disk-1"}
    assert run_sync(client.model_info())["model_path"] == str(path.resolve())
    assert_computes(after, dirs[1])
    update_weights_from_disk([client], iter_safetensors_dir(dirs[0]),
                             out_dir=tmp_path / "push", weight_version="disk-2")
    assert [s.response_ids for s in client.generate_sync(PROMPTS, sampling_params=GREEDY)] == \
        [s.response_ids for s in before]


def post(server, path, body):
    req = urllib.request.Request(server.url + path, data=json.dumps(body).encode(), headers={
        "Authorization": f"Bearer {server.api_key}", "Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=30) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


def test_bad_updates_are_refused_before_any_broadcast_and_the_group_recovers(client, server,
                                                                             dirs):
    sync = DistributedWeightSync([client], timeout_s=30)
    sync.init()
    try:
        assert post(server, "/begin_weight_update", {})[0] == 200
        assert post(server, "/begin_weight_update", {}) == (400, {
            "success": False,
            "message": "a weight-update session is already open; call end_weight_update() first"})
        for names, dtypes, shapes, needle in [
            (["model.layers.9.mlp.gate.weight"], ["float32"], [[8, 64]], "unknown checkpoint"),
            (["lm_head.weight"], ["float32"], [[64, 65]], "has shape [64, 65]"),
            (["lm_head.weight"], ["int64"], [[64, 64]], "dtype 'int64'"),
            (["lm_head.weight"], ["float32"], [[64, -64]], "Negative dimension"),
            (["a", "b"], ["float32"], [[1]], "equal length"),
        ]:
            status, out = post(server, "/update_weights_from_distributed", {
                "names": names, "dtypes": dtypes, "shapes": shapes,
                "group_name": sync.links[0].name})
            assert status == 400 and not out["success"] and needle in out["message"], out
        assert post(server, "/end_weight_update", {})[0] == 200
        assert post(server, "/end_weight_update", {})[0] == 400
        # Nothing was broadcast, so the group still works.
        sync.push(iter_safetensors_dir(dirs[0]), weight_version="ok-1")
        # A push the server refuses (a name it does not know) fails loudly, not by hanging ...
        bogus = [("model.layers.0.mlp.bogus.weight", torch.zeros(2, 2))]
        with pytest.raises(WeightSyncError, match="unknown checkpoint tensor"):
            sync.push(bogus, weight_version="never")
        with pytest.raises(WeightSyncError, match="init"):
            sync.push(iter_safetensors_dir(dirs[0]), weight_version="never")
        assert run_sync(client.weight_version()) == "ok-1"
    finally:
        sync.close()
    # ... and a fresh group works again.
    sync = DistributedWeightSync([client], timeout_s=30)
    sync.init()
    try:
        sync.push(iter_safetensors_dir(dirs[0]), weight_version="ok-2")
        assert run_sync(client.weight_version()) == "ok-2"
    finally:
        sync.close()
    with pytest.raises(RolloutError, match="does not exist"):  # close() destroyed it
        run_sync(client.destroy_weights_update_group(group_name=sync.links[0].name))


def test_buckets_respect_the_byte_budget_and_dtype():
    tensors = [("a", torch.zeros(10)), ("b", torch.zeros(10, dtype=torch.bfloat16)),
               ("c", torch.zeros(20)), ("d", torch.zeros(5)), ("e", torch.zeros(100))]
    buckets = list(iter_buckets(tensors, bucket_bytes=100, one_dtype_per_bucket=True))
    assert [[n for n, _ in b] for b in buckets] == [["a"], ["c", "d"], ["b"], ["e"]]
    mixed = list(iter_buckets(tensors, bucket_bytes=100, one_dtype_per_bucket=False))
    assert [[n for n, _ in b] for b in mixed] == [["a", "b"], ["c", "d"], ["e"]]
    with pytest.raises(ValueError, match="dtype"):
        list(iter_buckets([("x", torch.zeros(2, dtype=torch.int64))], bucket_bytes=10,
                          one_dtype_per_bucket=True))


TRAINER_SCRIPT = textwrap.dedent("""
    import os, sys, torch, torch.distributed as dist
    from moerl.rollout.client import RolloutClient, run_sync
    from moerl.rollout.weight_sync import DistributedWeightSync
    from moerl.rollout.weights import iter_safetensors_dir

    url, key, ckpt = sys.argv[1:4]
    # The trainer's own torchrun-style world (2 ranks, gloo).
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    if rank == 0:
        client = RolloutClient(url, api_key=key)
        sync = DistributedWeightSync([client], timeout_s=60)
        sync.init()
        sync.push(iter_safetensors_dir(ckpt), weight_version="from-world")
        sync.close()
        print("version", run_sync(client.weight_version()), flush=True)
    # The world group is untouched by the separate weight-update group.
    t = torch.tensor([rank + 1.0])
    dist.all_reduce(t)
    dist.barrier()
    print("rank", rank, "allreduce", t.item(), flush=True)
    dist.destroy_process_group()
""")


def test_push_from_rank_0_of_a_separate_trainer_world(server, dirs, tmp_path):
    script = tmp_path / "trainer.py"
    script.write_text(TRAINER_SCRIPT)
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    procs = []
    for rank in range(2):
        env = {**__import__("os").environ, "RANK": str(rank), "WORLD_SIZE": "2",
               "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "OMP_NUM_THREADS": "1"}
        procs.append(subprocess.Popen(
            [sys.executable, str(script), server.url, server.api_key, str(dirs[1])], env=env,
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
    outs = []
    for p in procs:
        try:
            outs.append(p.communicate(timeout=180)[0])
        except subprocess.TimeoutExpired:
            for q in procs:
                q.kill()
            raise
        assert p.returncode == 0, outs[-1]
    assert "version from-world" in outs[0]
    assert "allreduce 3.0" in outs[0] and "allreduce 3.0" in outs[1]
    # Restore model A for any later test.
    update = DistributedWeightSync([RolloutClient(server.url, api_key=server.api_key)])
    update.init()
    update.push(iter_safetensors_dir(dirs[0]), weight_version="default")
    update.close()


@pytest.mark.parametrize("info, ranks", [
    ({"tp_size": 4, "dp_size": 1, "pp_size": 1}, 4),  # SGLang at TP=4: ranks offset + 0..3
    ({"tp_size": 8, "dp_size": 2, "enable_dp_attention": True}, 8),  # DP attention: one TP group
    ({"tp_size": 1}, 1), ({}, 1)])
def test_a_servers_group_ranks_come_from_its_server_info(info, ranks):
    from moerl.rollout.weight_sync import group_ranks

    assert group_ranks(info) == ranks


@pytest.mark.parametrize("info", [{"tp_size": 2, "dp_size": 2}, {"tp_size": 2, "pp_size": 2}])
def test_replicas_or_stages_behind_one_server_are_refused_for_a_distributed_push(info):
    from moerl.rollout.weight_sync import WeightSyncError, group_ranks

    with pytest.raises(WeightSyncError, match="weight_sync.method=disk"):
        group_ranks(info, "http://sglang-0:30000")
