"""Routing replay: slicing and agreement math in-process, upstream's RouterReplay structure that
moerl relies on (STYLE rule 7), and the replay checks on real models in spawned processes
(``tests/dist/replay_checks.py``: TP=2/EP=2 under torchrun on gloo, and TP=1)."""

from __future__ import annotations

import inspect
import json
import sys

import pytest
from e2e_util import REPO, run
import torch

from moerl.routes import route_dtype
from moerl.tiny_model import TINY_QWEN3_MOE
from moerl.trainer import megatron_version
from moerl.trainer.model import architecture_from_hf
from moerl.trainer.parallel import ParallelLayout
from moerl.trainer.routing_replay import (MegatronRoutes, RoutingReplay, pack_routes_BTLK,
                                          padding_routes, routes_to_megatron, routing_agreement,
                                          shard_routes)

ARCH = architecture_from_hf({**TINY_QWEN3_MOE, "model_type": "qwen3_moe"})  # layer 0 dense


def layout(tp: int, tp_rank: int) -> ParallelLayout:
    return ParallelLayout(world=tp, rank=tp_rank, tp=tp, ep=1, etp=1, dp=1, expert_dp=tp,
                          tp_rank=tp_rank, ep_rank=0, dp_rank=0)


def wire_routes(length: int, seed: int) -> torch.Tensor:
    """SGLang layout [length - 1, L_all, K]: dense layer 0 zeros, distinct ids elsewhere."""
    gen = torch.Generator().manual_seed(seed)
    routes = torch.zeros(length - 1, ARCH.num_layers, ARCH.top_k, dtype=torch.int32)
    for t in range(length - 1):
        for layer in ARCH.moe_layer_ids:
            routes[t, layer] = torch.randperm(ARCH.num_experts, generator=gen)[: ARCH.top_k]
    return routes


# ----------------------------------------------------------------------------- slicing


def test_padding_routes_are_distinct_valid_and_spread():
    pad = padding_routes(6, top_k=3, num_experts=8)
    assert pad.dtype == torch.int32
    assert pad.tolist() == [[0, 1, 2], [3, 4, 5], [6, 7, 0], [1, 2, 3], [4, 5, 6], [7, 0, 1]]
    with pytest.raises(ValueError, match="exceeds"):
        padding_routes(2, top_k=9, num_experts=8)


def test_pack_drops_dense_layers_and_pads_without_duplicates():
    lengths = (6, 3)
    wire = [wire_routes(n, seed=n) for n in lengths]
    packed = pack_routes_BTLK(wire, seq_len=8, arch=ARCH)
    assert packed.shape == (2, 8, 2, ARCH.top_k) and packed.dtype == route_dtype(ARCH.num_experts)
    for i, n in enumerate(lengths):
        assert torch.equal(packed[i, : n - 1], wire[i][:, [1, 2]])
        pad = packed[i, n - 1:]  # the sample's final token and the right padding
        assert pad.min() >= 0 and pad.max() < ARCH.num_experts
        assert bool((pad[..., 0] != pad[..., 1]).all())
    # Routes recorded by the trainer (MoE layers only, one per token) pack unchanged.
    moe_only = [packed[0, :6], packed[1, :3]]
    assert torch.equal(pack_routes_BTLK(moe_only, seq_len=8, arch=ARCH)[:, :5], packed[:, :5])


@pytest.mark.parametrize("bad, match", [
    ([wire_routes(4, 0), None], "missing"),
    ([torch.zeros(3, 2, 3, dtype=torch.int32)], "must be"),
    ([torch.zeros(3, 4, 2, dtype=torch.int32)], "4 layers"),
    ([wire_routes(12, 0)], "exceed"),
    ([torch.full((2, 3, 2), 8, dtype=torch.int32)], "lie in"),
    ([torch.ones(2, 3, 2, dtype=torch.int32)], "repeats"),  # dense rows of zeros kept: L=2 w/o drop
])
def test_pack_refuses_unreplayable_routes(bad, match):
    with pytest.raises(ValueError, match=match):
        pack_routes_BTLK(bad, seq_len=8, arch=ARCH)


def test_shard_is_s_major_per_sequence_parallel_rank():
    # route id = 10 * b + t for B=2, T=4, one layer, K=1
    routes_BTLK = (10 * torch.arange(2)[:, None] + torch.arange(4)[None, :]).view(2, 4, 1, 1)
    got = [shard_routes(routes_BTLK, layout=layout(2, r)).per_layer[0].flatten().tolist()
           for r in range(2)]
    assert got == [[0, 10, 1, 11], [2, 12, 3, 13]]  # rank r: positions 2r..2r+1, [s, b] order
    assert shard_routes(routes_BTLK, layout=layout(1, 0)).per_layer[0].flatten().tolist() == [
        0, 10, 1, 11, 2, 12, 3, 13]
    with pytest.raises(ValueError, match="multiple of parallel.tp"):
        shard_routes(routes_BTLK, layout=layout(3, 0))


@pytest.mark.parametrize("num_experts", [64, 300])  # uint8, int16 on the host
def test_routes_reach_the_device_compact_and_widen_to_int64_only_there(num_experts):
    """Host-held routes cross to the model's device in their compact type; Megatron's int64 index
    is made on the device (``.to(device, int64)`` in one call would widen on the host and copy 8x
    the bytes). The "meta" device stands in for a GPU; a dispatch mode logs every widening."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class WideningLog(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.inputs = []  # (device type, dtype) of every tensor widened to int64

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            src = args[0] if args and isinstance(args[0], torch.Tensor) else None
            if (isinstance(out, torch.Tensor) and out.dtype == torch.int64 and src is not None
                    and src.dtype != torch.int64):
                self.inputs.append((src.device.type, src.dtype))
            return out

    routes_BTLK = torch.randint(0, num_experts, (2, 4, 3, 2)).to(route_dtype(num_experts))
    with WideningLog() as log:
        got = shard_routes(routes_BTLK, layout=layout(2, 1), device="meta")
    assert {t.device.type for t in got.per_layer} == {"meta"}
    assert {t.dtype for t in got.per_layer} == {torch.int64}
    assert log.inputs == [("meta", route_dtype(num_experts))]


def test_routes_to_megatron_round_trip():
    lengths, seq_len, tp = (8, 5, 2), 8, 2
    wire = [wire_routes(n, seed=10 + n) for n in lengths]
    shards = [routes_to_megatron(wire, seq_len=seq_len, arch=ARCH, layout=layout(tp, r))
              for r in range(tp)]
    assert all(isinstance(s, MegatronRoutes) and s.batch_size == 3 and s.seq_len == seq_len
               for s in shards)
    for l in range(2):
        full_N = torch.cat([s.per_layer[l] for s in shards])  # what an SP all-gather returns
        assert full_N.dtype == torch.int64
        full_BTK = full_N.view(seq_len, 3, ARCH.top_k).transpose(0, 1)
        for i, n in enumerate(lengths):
            assert torch.equal(full_BTK[i, : n - 1], wire[i][:, ARCH.moe_layer_ids[l]].long())


# ----------------------------------------------------------------------------- telemetry


def test_routing_agreement_hand_computed():
    # B=1, T=3, L=2, K=2. Position 0: both layers agree (order differs in layer 1).
    # Position 1: layer 0 agrees, layer 1 differs. Position 2: masked out (differs everywhere).
    a = torch.tensor([[[[0, 1], [2, 3]], [[4, 5], [6, 7]], [[0, 1], [0, 1]]]])
    b = torch.tensor([[[[1, 0], [3, 2]], [[5, 4], [6, 1]], [[2, 3], [2, 3]]]])
    mask = torch.tensor([[True, True, False]])
    got = routing_agreement(a, b, mask)
    assert got["route_agreement"].item() == pytest.approx(3 / 4)
    assert got["token_route_mismatch"].item() == pytest.approx(1 / 2)
    assert got["layer_agreement"].tolist() == [1.0, 0.5]  # layer 1 differs at position 1
    empty = routing_agreement(a, b, torch.zeros_like(mask))
    assert torch.isnan(empty["route_agreement"]) and torch.isnan(empty["token_route_mismatch"])
    with pytest.raises(ValueError, match="mask_BT"):
        routing_agreement(a, b, mask[:, :2])


# ----------------------------------------------------------------------------- upstream structure


@pytest.fixture
def isolated_instances():
    """RouterReplay keeps a process-global list; leave it as found."""
    from megatron.core.transformer.moe.router_replay import RouterReplay

    saved = list(RouterReplay.global_router_replay_instances)
    RouterReplay.clear_global_router_replay_instances()
    yield RouterReplay
    RouterReplay.global_router_replay_instances[:] = saved


@pytest.mark.compat
def test_upstream_router_replay_structure(isolated_instances):
    """moerl's subclass and RoutingReplay rely on exactly these upstream pieces (0.16.1, 0.19.2)."""
    from megatron.core.transformer.moe import moe_utils
    from megatron.core.transformer.moe.router import Router, TopKRouter
    from megatron.core.transformer.moe.router_replay import RouterReplayAction

    RouterReplay = isolated_instances
    assert {a.name for a in RouterReplayAction} == {"RECORD", "REPLAY_FORWARD", "REPLAY_BACKWARD"}
    params = list(inspect.signature(RouterReplay.get_replay_topk).parameters)
    assert params == ["self", "scores", "topk", "num_groups", "group_topk", "default_compute_topk"]
    # TopKRouter creates one instance per router and hands it to the top-k function.
    assert "RouterReplay()" in inspect.getsource(TopKRouter.__init__)
    assert "router_replay=self.router_replay" in inspect.getsource(TopKRouter.routing)
    assert "router_replay" in inspect.signature(moe_utils.topk_routing_with_score_function).parameters

    inst = RouterReplay()
    assert RouterReplay.global_router_replay_instances == [inst]
    target = torch.tensor([[1, 0]])
    inst.set_target_indices(target)
    assert inst.target_topk_idx is target and inst.replay_backward_list == [target]
    inst.record_indices(target)
    assert inst.get_recorded_indices() is target
    inst.clear_indices()
    assert (inst.target_topk_idx, inst.recorded_topk_idx, inst.replay_backward_list) == (
        None, None, [])
    inst.set_router_replay_action(RouterReplayAction.RECORD)
    assert inst.router_replay_action is RouterReplayAction.RECORD
    inst.clear_router_replay_action()
    assert inst.router_replay_action is None

    # The all-layer entry points RoutingReplay drives the instances with, in instance order.
    other = RouterReplay()
    RouterReplay.set_replay_data([target, target + 1])
    assert inst.target_topk_idx is target and torch.equal(other.target_topk_idx, target + 1)
    with pytest.raises(ValueError, match="does not match instances"):
        RouterReplay.set_replay_data([target])
    RouterReplay.set_global_router_replay_action(RouterReplayAction.REPLAY_BACKWARD)
    assert {inst.router_replay_action, other.router_replay_action} == {
        RouterReplayAction.REPLAY_BACKWARD}
    other.record_indices(target)
    assert RouterReplay.get_recorded_data() == [None, target]
    RouterReplay.clear_global_router_replay_action()
    RouterReplay.clear_global_indices()
    assert all(r.router_replay_action is None and r.target_topk_idx is None
               and r.recorded_topk_idx is None and r.replay_backward_list == []
               for r in (inst, other))
    if megatron_version.at_least(0, 19):
        # Each instance learns its layer from the router (TransformerLayer -> MoELayer -> Router).
        assert inst.layer_number is None
        assert "self.router_replay.layer_number = layer_number" in inspect.getsource(
            Router.set_layer_number)
    else:
        assert not hasattr(inst, "layer_number")


@pytest.mark.compat
@pytest.mark.parametrize("pre_softmax", [False, True])
def test_subclass_through_upstream_topk_routing(isolated_instances, pre_softmax):
    """Upstream's top-k routing with moerl's subclass installed: replay uses the given experts
    with gate weights from the given logits (softmax over the K for pre_softmax=False, the full
    softmax gathered for True), captures the natural top-k, records, and pops in backward."""
    from megatron.core.transformer.moe.moe_utils import topk_routing_with_score_function
    from megatron.core.transformer.moe.router_replay import RouterReplayAction as Action

    arch = architecture_from_hf({**TINY_QWEN3_MOE, "model_type": "qwen3_moe",
                                 "mlp_only_layers": [], "num_hidden_layers": 1})
    inst = isolated_instances()
    inst.layer_number = 1  # what the router sets on 0.19 (0.16 does not look at it)
    rr = RoutingReplay(arch, layout(1, 0), tp_group=None)
    assert type(inst).__name__ == "_MoerlRouterReplay"
    logits = torch.tensor([[3.0, 1.0, 0.0, 2.0, -1.0, 0.5, -2.0, 0.0],
                           [0.0, 0.0, 4.0, 1.0, 2.0, 0.0, 0.0, 3.0]], requires_grad=True)
    given = torch.tensor([[6, 4], [0, 1]])

    def route():
        return topk_routing_with_score_function(logits, 2, use_pre_softmax=pre_softmax,
                                                router_replay=inst)

    routes = MegatronRoutes(per_layer=(given,), batch_size=2, seq_len=1)
    with rr.replay(routes, capture_natural=True) as rp:
        with torch.no_grad():  # as in a checkpointed forward
            probs, rmap = route()
        assert inst.moerl_natural_idx.tolist() == [[0, 3], [2, 7]]
        rp.switch_to_backward()
        assert inst.router_replay_action is Action.REPLAY_BACKWARD
        probs_bwd, rmap_bwd = route()  # the recompute in backward pops the pushed routes
        assert inst.replay_backward_list == []
        (probs_bwd * torch.arange(8.0)).sum().backward()  # a plain sum of gates is constant
    assert torch.equal(probs_bwd, probs) and torch.equal(rmap_bwd, rmap)
    assert rmap.nonzero().tolist() == [[0, 4], [0, 6], [1, 0], [1, 1]]
    z = logits.detach()
    if pre_softmax:
        want = torch.softmax(z, -1).gather(1, given)
    else:
        want = torch.softmax(z.gather(1, given), -1)
    torch.testing.assert_close(probs.gather(1, given), want)
    assert logits.grad is not None and bool((logits.grad != 0).any())
    assert inst.router_replay_action is None and inst.target_topk_idx is None

    with rr.record(batch_size=2, seq_len=1) as rec:
        route()
    assert rec.routes_BTLK.tolist() == [[[[0, 3]]], [[[2, 7]]]]  # [B=2, T=1, L=1, K=2]


@pytest.mark.compat
@pytest.mark.skipif(not megatron_version.at_least(0, 19),
                    reason="0.16's RouterReplay does not know its layer")
def test_routing_replay_refuses_instances_of_other_layers(isolated_instances):
    instances = [isolated_instances() for _ in ARCH.moe_layer_ids]
    for inst, layer in zip(instances, (1, 3)):  # the model's MoE layers are 2 and 3 (1-based)
        inst.layer_number = layer
    with pytest.raises(ValueError, match=r"belong to layers \[1, 3\].*MoE layers are \[2, 3\]"):
        RoutingReplay(ARCH, layout(1, 0), tp_group=None)
    instances[0].layer_number = 2
    RoutingReplay(ARCH, layout(1, 0), tp_group=None)


@pytest.mark.compat
def test_routing_replay_refuses_a_second_model(isolated_instances):
    for _ in range(2 * len(ARCH.moe_layer_ids)):  # two models' routers
        isolated_instances()
    with pytest.raises(ValueError, match="a second model with routing replay was built"):
        RoutingReplay(ARCH, layout(1, 0), tp_group=None)


# ----------------------------------------------------------------------------- real models



def _results(stdout: str) -> list[dict]:
    prefix = "REPLAY_CHECKS_OK "
    lines = [line[len(prefix):] for line in stdout.splitlines() if line.startswith(prefix)]
    assert len(lines) == 1, stdout[-3000:]
    return json.loads(lines[0])


@pytest.mark.compat
@pytest.mark.timeout(360)
def test_replay_on_real_models_tp2_ep2():
    script = str(REPO / "tests/dist/replay_checks.py")
    out = run([sys.executable, "-m", "torch.distributed.run", "--standalone",
                "--nproc_per_node", "2", script, "--tp", "2", "--ep", "2"], timeout=330).stdout
    results = _results(out)
    assert sorted(r["rank"] for r in results) == [0, 1]
    for r in results:
        for flavour in ("norm_topk_True", "norm_topk_False", "sigmoid_grouped", "olmoe"):
            assert r[flavour]["exact_fraction"] == 1.0
            assert r[flavour]["perturbed_exact_fraction"] == 1.0


@pytest.mark.timeout(360)
def test_replay_on_real_models_tp1():
    out = run([sys.executable, str(REPO / "tests/dist/replay_checks.py"), "--tp", "1",
                "--ep", "1"], timeout=330).stdout
    (result,) = _results(out)
    assert result["norm_topk_False"]["exact_fraction"] == 1.0
    assert result["sigmoid_grouped"]["exact_fraction"] == 1.0
    assert result["olmoe"]["exact_fraction"] == 1.0
