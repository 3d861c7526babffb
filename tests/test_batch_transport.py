"""Sharded rollout transport: each rank holds only its data-parallel rank's routes and masks, in
the smallest integer type, and selects exactly what the broadcast transport gives it."""

from __future__ import annotations

import json
import sys

import pytest
import torch

from e2e_util import run
from moerl.routes import route_dtype


@pytest.mark.parametrize("experts,dtype", [(1, torch.uint8), (128, torch.uint8),
                                           (256, torch.uint8), (257, torch.int16),
                                           (32768, torch.int16), (40000, torch.int32)])
def test_route_dtype_is_the_smallest_that_holds_every_expert_id(experts, dtype):
    assert route_dtype(experts) == dtype
    info = torch.iinfo(dtype)
    assert info.min <= 0 and experts - 1 <= info.max


@pytest.mark.parametrize("world,tp", [(4, 2), (3, 1)])
def test_sharded_transport_sends_each_rank_its_rows(world, tp, tmp_path):
    rows = 11
    run([sys.executable, "-m", "torch.distributed.run", "--standalone",
                f"--nproc_per_node={world}", "tests/dist/transport_check.py", "--tp", str(tp),
                "--rows", str(rows), "--out", str(tmp_path)], timeout=240)
    records = [json.loads((tmp_path / f"rank_{r}.json").read_text()) for r in range(world)]
    assert len(records) == world
    dp = world // tp
    for r in records:
        assert r["problems"] == [], r
        assert r["dp_rank"] == r["rank"] // tp
        assert r["rows"] == list(range(r["dp_rank"], rows, dp))  # the same rows on its TP ranks
        assert r["route_rows"] == len(r["rows"]) and r["broadcast_route_rows"] == rows
        assert r["route_dtype"] == "torch.uint8"


VOLATILE = ("time/", "rollout/server_restarts")


@pytest.mark.slow
@pytest.mark.parametrize("replay", ["r3", "r2"])
def test_sharded_and_broadcast_transport_train_bit_for_bit_alike(replay, warm_model, tmp_path):
    """Two data-parallel ranks (TP 1, EP 2) with routes and masks: same metrics and weights."""
    from safetensors.torch import load_file

    from e2e_util import fast_overrides, read_metrics, torchrun

    runs = {}
    for transport in ("sharded", "broadcast"):
        out = tmp_path / transport
        torchrun(["configs/scaling_grpo.yaml", *fast_overrides(
            warm_model, out, **{"training.steps": 2, "parallel.tp": 1, "parallel.ep": 2,
                                "parallel.batch_transport": transport,
                                "algorithm.routing_replay": replay,
                                "rollout.engine_max_batch_size": 1})], timeout=420)
        runs[transport] = (read_metrics(out), load_file(out / "hf" / "model.safetensors"))
    (ma, wa), (mb, wb) = runs["sharded"], runs["broadcast"]
    assert [r["step"] for r in ma] == [r["step"] for r in mb] == [0, 1]
    for ra, rb in zip(ma, mb):
        assert ra.keys() == rb.keys()
        assert "routing/route_agreement" in ra
        differing = {k: (ra[k], rb[k]) for k in ra
                     if not k.startswith(VOLATILE) and ra[k] != rb[k]}
        assert not differing, (ra["step"], differing)
    assert wa.keys() == wb.keys()
    assert all(torch.equal(wa[k], wb[k]) for k in wa)
