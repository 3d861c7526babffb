"""Routing-replay checks on real Megatron models, one process per rank (torchrun, gloo).

Run by ``tests/test_routing_replay.py``:
    torchrun --nproc_per_node 2 tests/dist/replay_checks.py --tp 2 --ep 2
    python tests/dist/replay_checks.py --tp 1 --ep 1
For each router flavour (``norm_topk_prob`` True -> ``moe_router_pre_softmax=False``, and False ->
``True``, on the tiny Qwen3-MoE; ``sigmoid_grouped``, a GLM-4.5-shaped model with a non-zero expert
bias, grouped top-k, a scaling factor and a shared expert; ``olmoe``, an OLMoE-shaped model (softmax
without renormalisation, QK-norm over the full projection across TP ranks); random Megatron init) it checks, on a
batch of samples of different lengths with right padding (for the sigmoid flavour the given routes
ignore the group limit, so exactness also proves group selection is skipped under replay, and the
hand gate weights are the unbiased sigmoid renormalised and scaled: the bias never enters):
  slicing      routes_to_megatron gathered over the SP ranks == the packed routes; dense layers
               dropped; padding rows distinct valid ids.
  exactness    the routing map the dispatcher receives names exactly the given experts for 100%
               of (token, layer), gate weights are the trainer's own scores at those experts.
  r2 identity  replaying recorded natural routes reproduces the natural logits bit for bit.
  perturbed    after a large perturbation of the router weights natural routes move, replay
               still routes to the given experts, and the natural capture == a record pass.
  gradients    every router weight gets a nonzero gradient under replay.
  recompute    a model built with activation recompute, same weights and routes, gives the
               same gradients; the backward recompute replays the same experts.
  consumption  skipping the backward after switch_to_backward() fails the consumption assert.
  restore      an exception inside a context leaves every router routing naturally.
  second model building another routing-replay model makes RoutingReplay refuse.
Rank 0 prints ``REPLAY_CHECKS_OK <json list, one entry per rank>`` when every check passed.
"""

from __future__ import annotations

import argparse
import json

import torch
import torch.distributed as dist
from megatron.core.transformer.moe.router_replay import RouterReplay

from moerl.tiny_model import TINY_QWEN3_MOE
from moerl.trainer.model import architecture_from_hf, build_gpt_model
from moerl.trainer.parallel import destroy_parallel, init_parallel
from moerl.trainer.routing_replay import (RoutingReplay, pack_routes_BTLK, routes_to_megatron,
                                          routing_agreement)

FLAVOURS = ("norm_topk_True", "norm_topk_False", "sigmoid_grouped", "olmoe")
LENGTHS = (12, 9, 5)  # tokens per sample; seq_len 12 is a multiple of tp
SEQ_LEN = 12


def tiny_arch(flavour: str):
    """``norm_topk_True`` / ``norm_topk_False``: the tiny Qwen3-MoE with either softmax router
    path; ``sigmoid_grouped``: a GLM-4.5-shaped model (sigmoid + expert bias, 4 groups top-2,
    scaling factor 2.5, shared expert, dense layer 0); ``olmoe``: OLMoE-shaped (softmax top-4 of 8
    without renormalisation, full-projection QK-norm, GQA)."""
    if flavour == "olmoe":
        from transformers import OlmoeConfig

        return architecture_from_hf(OlmoeConfig(
            vocab_size=61, hidden_size=64, intermediate_size=32, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, num_experts=8, num_experts_per_tok=4,
            norm_topk_prob=False))
    if flavour == "sigmoid_grouped":
        from transformers import Glm4MoeConfig

        return architecture_from_hf(Glm4MoeConfig(
            vocab_size=61, hidden_size=64, intermediate_size=96, moe_intermediate_size=32,
            num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
            n_routed_experts=8, n_shared_experts=1, num_experts_per_tok=4, n_group=4,
            topk_group=2, first_k_dense_replace=1, routed_scaling_factor=2.5,
            norm_topk_prob=True, attention_bias=True, partial_rotary_factor=0.5))
    from transformers import Qwen3MoeConfig

    fields = {**TINY_QWEN3_MOE, "norm_topk_prob": flavour == "norm_topk_True"}
    rope_theta = fields.pop("rope_theta")
    cfg = Qwen3MoeConfig(**fields, rope_parameters={"rope_type": "default",
                                                    "rope_theta": rope_theta})
    return architecture_from_hf(cfg)


def hand_gate_weights(arch, logits_NE, given_NK):
    """Gate weights at the given experts, computed by hand from the router logits: softmax
    (gathered, or over the K when renormalised), or the unbiased sigmoid renormalised over the K
    and scaled; the expert bias never enters."""
    rule = arch.router
    if rule.score == "sigmoid":
        w_NK = torch.sigmoid(logits_NE).gather(1, given_NK)
        return w_NK / (w_NK.sum(-1, keepdim=True) + 1e-20) * rule.scaling_factor
    if rule.norm_topk_prob:
        return torch.softmax(logits_NE.gather(1, given_NK), -1)
    return torch.softmax(logits_NE, -1).gather(1, given_NK)


def hand_natural_topk(arch, logits_NE, bias_E):
    """The HF router's selection (transformers' DeepSeek-V3/GLM-4.5 code, re-derived): biased
    sigmoid scores, groups ranked by the sum of their top-2, top-k within the best groups."""
    rule = arch.router
    if rule.score == "softmax":
        return logits_NE.topk(arch.top_k, dim=-1).indices
    choice_NE = torch.sigmoid(logits_NE) + bias_E
    if rule.num_groups:
        n = choice_NE.shape[0]
        group_NG = choice_NE.view(n, rule.num_groups, -1).topk(2, dim=-1).values.sum(-1)
        keep_NG = torch.zeros_like(group_NG).scatter_(
            1, group_NG.topk(rule.group_topk, dim=-1).indices, 1.0).bool()
        keep_NE = keep_NG.repeat_interleave(arch.num_experts // rule.num_groups, dim=1)
        choice_NE = choice_NE.masked_fill(~keep_NE, float("-inf"))
    return choice_NE.topk(arch.top_k, dim=-1).indices


def make_batch(arch, seed: int):
    """Token ids [B, T] (right-padded with 0) and SGLang-layout routes per sample."""
    gen = torch.Generator().manual_seed(seed)
    ids_BT = torch.zeros(len(LENGTHS), SEQ_LEN, dtype=torch.long)
    wire = []
    for i, length in enumerate(LENGTHS):
        ids_BT[i, :length] = torch.randint(3, arch.vocab_size, (length,), generator=gen)
        routes = torch.zeros(length - 1, arch.num_layers, arch.top_k, dtype=torch.int32)
        for layer in arch.moe_layer_ids:
            for t in range(length - 1):
                routes[t, layer] = torch.randperm(arch.num_experts, generator=gen)[: arch.top_k]
        wire.append(routes)
    return ids_BT, wire


def gather_tokens(local_N, layout, group, batch: int):
    """Test-side SP gather: [T/tp * B, ...] s-major shards -> [B, T, ...]."""
    if layout.tp > 1:
        shards = [torch.empty_like(local_N) for _ in range(layout.tp)]
        dist.all_gather(shards, local_N.contiguous(), group=group)
        local_N = torch.cat(shards)
    return local_N.view(SEQ_LEN, batch, *local_N.shape[1:]).transpose(0, 1)


def routers(model):
    return [layer.mlp.router for layer in model.decoder.layers if hasattr(layer.mlp, "router")]


class RouterTap:
    """Forward hooks on the routers: what the dispatcher actually receives."""

    def __init__(self, model):
        self.calls = []  # per router call: (layer index, input, probs [N, E], routing_map [N, E])
        self.handles = [r.register_forward_hook(self._hook(i)) for i, r in enumerate(routers(model))]

    def _hook(self, i):
        def hook(module, args, output):
            self.calls.append((i, args[0].detach(), output[0].detach(), output[1].detach()))
        return hook

    def remove(self):
        for h in self.handles:
            h.remove()


def sets_equal_fraction(map_NE, given_NK):
    chosen_NK = map_NE.nonzero()[:, 1].view(map_NE.shape[0], -1)  # K per row, ascending
    assert chosen_NK.shape == given_NK.shape, (chosen_NK.shape, given_NK.shape)
    return (chosen_NK == given_NK.sort(-1).values).all(-1).float().mean().item()


def check_forward_calls(calls, mr, router_mods, *, arch):
    """Every router call used the given experts, with gate weights from its own scores.

    Returns the fractions of exact rows per call and each layer's natural top-k [N, K] computed
    here from the router's input (the last call per layer).
    """
    fractions, natural = [], {}
    for i, x, probs_NE, map_NE in calls:
        given_NK = mr.per_layer[i]
        fractions.append(sets_equal_fraction(map_NE, given_NK))
        logits_NE = x.reshape(-1, x.shape[-1]).float() @ router_mods[i].weight.detach().float().T
        want_NK = hand_gate_weights(arch, logits_NE, given_NK)
        torch.testing.assert_close(probs_NE.gather(1, given_NK), want_NK, rtol=1e-5, atol=1e-6)
        assert bool((probs_NE[~map_NE] == 0).all())
        bias = router_mods[i].expert_bias if arch.router.expert_bias else None
        natural[i] = hand_natural_topk(arch, logits_NE, bias)
    return fractions, [natural[i] for i in sorted(natural)]


def check_natural(natural_BTLK, natural_NK_per_layer, layout, groups, batch):
    assert natural_BTLK.dtype == torch.int32
    for l, natural_NK in enumerate(natural_NK_per_layer):
        want = gather_tokens(natural_NK, layout, groups.tp, batch)
        # top-k sets; ties between equal logits could order differently
        assert torch.equal(natural_BTLK[:, :, l].long().sort(-1).values, want.sort(-1).values)


def assert_natural(rr):
    for r in rr._routers:
        assert r.router_replay_action is None and r.target_topk_idx is None
        assert r.replay_backward_list == [] and r.recorded_topk_idx is None


def check_recompose(model, rr, arch, layout, ids_BT, recorded_BTLK):
    """Token <-> route correspondence, independent of any slicing convention: per-sample routes
    recorded in one batch composition, replayed in another (samples permuted, longer padding),
    reproduce that composition's natural logits at every real token; and its natural routes per
    sample equal the first composition's."""
    order, seq_len = (2, 0, 1), SEQ_LEN + 2 * layout.tp
    ids2_BT = torch.zeros(len(order), seq_len, dtype=torch.long)
    for j, i in enumerate(order):
        ids2_BT[j, : LENGTHS[i]] = ids_BT[i, : LENGTHS[i]]
    pos2_BT = torch.arange(seq_len).expand(len(order), seq_len)
    per_sample = [recorded_BTLK[i, : LENGTHS[i]] for i in order]
    mr2 = routes_to_megatron(per_sample, seq_len=seq_len, arch=arch, layout=layout)
    with torch.no_grad(), rr.record(batch_size=len(order), seq_len=seq_len) as rec2:
        natural_logits = model(ids2_BT, pos2_BT, attention_mask=None)
    with torch.no_grad(), rr.replay(mr2):
        replay_logits = model(ids2_BT, pos2_BT, attention_mask=None)
    max_diff = 0.0
    for j, i in enumerate(order):
        n = LENGTHS[i]
        assert torch.equal(rec2.routes_BTLK[j, :n].sort(-1).values,
                           recorded_BTLK[i, :n].sort(-1).values)
        torch.testing.assert_close(replay_logits[j, :n], natural_logits[j, :n],
                                   rtol=1e-5, atol=1e-5)
        max_diff = max(max_diff, (replay_logits[j, :n] - natural_logits[j, :n]).abs().max().item())
    return max_diff


def train_step(model, rr, mr, ids_BT, pos_BT, weight_BTV):
    model.zero_grad(set_to_none=True)
    with rr.replay(mr) as rp:
        logits = model(ids_BT, pos_BT, attention_mask=None)
        rp.switch_to_backward()
        (logits.float() * weight_BTV).sum().backward()
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def set_expert_bias(model, seed: int) -> None:
    """A non-zero selection bias (Megatron initialises it to 0), the same on every rank."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for r in routers(model):
            if getattr(r, "expert_bias", None) is not None:
                r.expert_bias.copy_(torch.randn(r.expert_bias.shape, generator=gen) * 0.05)


def run_flavour(layout, groups, *, flavour: str) -> dict:
    arch = tiny_arch(flavour)
    RouterReplay.clear_global_router_replay_instances()
    model = build_gpt_model(arch, layout)
    set_expert_bias(model, seed=5)
    rr = RoutingReplay(arch, layout, tp_group=groups.tp)
    ids_BT, wire = make_batch(arch, seed=1)
    batch = ids_BT.shape[0]
    pos_BT = torch.arange(SEQ_LEN).expand(batch, SEQ_LEN)
    out = {}

    # slicing
    packed_BTLK = pack_routes_BTLK(wire, seq_len=SEQ_LEN, arch=arch)
    mr = routes_to_megatron(wire, seq_len=SEQ_LEN, arch=arch, layout=layout)
    assert len(mr.per_layer) == len(arch.moe_layer_ids) == packed_BTLK.shape[2]
    for l, idx in enumerate(mr.per_layer):
        assert idx.dtype == torch.int64 and idx.shape == (SEQ_LEN // layout.tp * batch, arch.top_k)
        assert torch.equal(gather_tokens(idx, layout, groups.tp, batch), packed_BTLK[:, :, l].long())
    for i, length in enumerate(LENGTHS):
        assert torch.equal(packed_BTLK[i, : length - 1], wire[i][:, arch.moe_layer_ids])
        pad = packed_BTLK[i, length - 1:]
        assert pad.min() >= 0 and pad.max() < arch.num_experts
        assert bool((pad[..., 0] != pad[..., 1]).all())

    # exactness + gate weights
    tap = RouterTap(model)
    with torch.no_grad(), rr.replay(mr, capture_natural=True) as rp:
        model(ids_BT, pos_BT, attention_mask=None)
    fr, natural_NK = check_forward_calls(tap.calls, mr, routers(model), arch=arch)
    assert len(tap.calls) == len(arch.moe_layer_ids) and min(fr) == 1.0, fr
    out["exact_fraction"] = min(fr)
    assert_natural(rr)

    # The natural capture is the router's own top-k on the replayed pass's hidden states: the
    # first MoE layer sees what a natural pass sees, later layers see the replayed history.
    check_natural(rp.natural_routes_BTLK, natural_NK, layout, groups, batch)

    # r2 identity: record natural routes, replay them -> same logits
    with torch.no_grad(), rr.record(batch_size=batch, seq_len=SEQ_LEN) as rec:
        natural_logits = model(ids_BT, pos_BT, attention_mask=None)
    assert torch.equal(rp.natural_routes_BTLK[:, :, 0], rec.routes_BTLK[:, :, 0])
    mr_rec = routes_to_megatron([rec.routes_BTLK[i] for i in range(batch)], seq_len=SEQ_LEN,
                                arch=arch, layout=layout)
    with torch.no_grad(), rr.replay(mr_rec):
        replay_logits = model(ids_BT, pos_BT, attention_mask=None)
    assert torch.equal(replay_logits, natural_logits)
    full_mask = torch.ones(batch, SEQ_LEN, dtype=torch.bool)
    out["recompose_max_logit_diff"] = check_recompose(model, rr, arch, layout, ids_BT, rec.routes_BTLK)
    out["given_vs_natural"] = routing_agreement(packed_BTLK, rec.routes_BTLK, full_mask)[
        "route_agreement"].item()

    # perturbed router weights
    gen = torch.Generator().manual_seed(7)  # same on every rank: the router is replicated
    with torch.no_grad():
        for r in routers(model):
            r.weight.add_(torch.randn(r.weight.shape, generator=gen) * 3.0 * r.weight.std())
    with torch.no_grad(), rr.record(batch_size=batch, seq_len=SEQ_LEN) as rec2:
        model(ids_BT, pos_BT, attention_mask=None)
    moved = routing_agreement(rec.routes_BTLK, rec2.routes_BTLK, full_mask)["route_agreement"]
    assert moved.item() < 0.8, moved
    tap.calls.clear()
    with torch.no_grad(), rr.replay(mr, capture_natural=True) as rp2:
        model(ids_BT, pos_BT, attention_mask=None)
    fr, natural_NK = check_forward_calls(tap.calls, mr, routers(model), arch=arch)
    assert min(fr) == 1.0, fr
    check_natural(rp2.natural_routes_BTLK, natural_NK, layout, groups, batch)
    assert torch.equal(rp2.natural_routes_BTLK[:, :, 0], rec2.routes_BTLK[:, :, 0])
    out["perturbed_natural_agreement"] = moved.item()
    out["perturbed_exact_fraction"] = min(fr)

    # gradients reach the routers under replay
    weight_BTV = torch.randn(batch, SEQ_LEN, arch.padded_vocab_size(layout.tp) // layout.tp,
                             generator=torch.Generator().manual_seed(11 + layout.tp_rank))
    tap.calls.clear()
    grads = train_step(model, rr, mr, ids_BT, pos_BT, weight_BTV)
    router_grads = [grads[n] for n, _ in model.named_parameters() if n.endswith("router.weight")]
    assert len(router_grads) == len(arch.moe_layer_ids)
    assert all(g.abs().sum() > 0 for g in router_grads)
    out["router_grad_norms"] = [g.norm().item() for g in router_grads]
    assert_natural(rr)
    tap.remove()

    # recompute: same weights, same routes -> same gradients
    state = {n: p.detach().clone() for n, p in model.named_parameters()}
    RouterReplay.clear_global_router_replay_instances()
    model_rc = build_gpt_model(arch, layout, recompute=True)
    set_expert_bias(model_rc, seed=5)
    with torch.no_grad():
        for n, p in model_rc.named_parameters():
            p.copy_(state[n])
    rr_rc = RoutingReplay(arch, layout, tp_group=groups.tp)
    tap = RouterTap(model_rc)
    grads_rc = train_step(model_rc, rr_rc, mr, ids_BT, pos_BT, weight_BTV)
    # one checkpointed forward and one backward recompute per layer, both on the given experts
    assert len(tap.calls) == 2 * len(arch.moe_layer_ids), len(tap.calls)
    fr, natural_NK = check_forward_calls(tap.calls, mr, routers(model_rc), arch=arch)
    assert min(fr) == 1.0, fr
    assert grads_rc.keys() == grads.keys()
    max_diff = max((grads_rc[n] - grads[n]).abs().max().item() for n in grads)
    assert max_diff <= 1e-6, max_diff
    out["recompute_max_grad_diff"] = max_diff
    tap.remove()

    # consumption: a skipped backward leaves pushed routes unconsumed
    try:
        with rr_rc.replay(mr) as rp:
            model_rc(ids_BT, pos_BT, attention_mask=None)
            rp.switch_to_backward()
    except AssertionError as err:
        assert "not consumed" in str(err), err
    else:
        raise AssertionError("unconsumed replay routes went unnoticed")
    assert_natural(rr_rc)

    # restore after exceptions: one raised by the caller, one by misfit routes
    with torch.no_grad(), rr_rc.record(batch_size=batch, seq_len=SEQ_LEN) as before:
        model_rc(ids_BT, pos_BT, attention_mask=None)
    try:
        with torch.no_grad(), rr_rc.replay(mr):
            model_rc(ids_BT, pos_BT, attention_mask=None)
            raise KeyError("boom")
    except KeyError:
        pass
    assert_natural(rr_rc)
    short = routes_to_megatron(wire, seq_len=SEQ_LEN + 2 * layout.tp, arch=arch, layout=layout)
    try:
        with torch.no_grad(), rr_rc.replay(short):
            model_rc(ids_BT, pos_BT, attention_mask=None)
    except ValueError as err:
        assert "sliced for another" in str(err), err
    else:
        raise AssertionError("misfit routes were accepted")
    assert_natural(rr_rc)
    with torch.no_grad(), rr_rc.record(batch_size=batch, seq_len=SEQ_LEN) as after:
        model_rc(ids_BT, pos_BT, attention_mask=None)
    assert torch.equal(before.routes_BTLK, after.routes_BTLK)

    # a second routing-replay model in the process
    build_gpt_model(arch, layout)
    for make in (lambda: RoutingReplay(arch, layout, tp_group=groups.tp),
                 lambda: rr_rc.record(batch_size=batch, seq_len=SEQ_LEN).__enter__()):
        try:
            make()
        except (ValueError, RuntimeError) as err:
            assert "second model" in str(err), err
        else:
            raise AssertionError("a second routing-replay model went unnoticed")
    RouterReplay.clear_global_router_replay_instances()
    return out


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--tp", type=int, required=True)
    parser.add_argument("--ep", type=int, required=True)
    args = parser.parse_args()
    layout, groups = init_parallel(tp=args.tp, ep=args.ep, etp=1, seed=0)
    try:
        result = {flavour: run_flavour(layout, groups, flavour=flavour)
                  for flavour in FLAVOURS}
        # Rank 0 prints every rank's result on one line: under torchrun (unbuffered workers)
        # print's text and newline are two writes, and two ranks' lines interleaved in CI.
        results = [None] * dist.get_world_size()
        dist.all_gather_object(results, {"rank": layout.rank, **result})
        if layout.rank == 0:
            print("REPLAY_CHECKS_OK " + json.dumps(results), flush=True)
    finally:
        destroy_parallel()


if __name__ == "__main__":
    main()
