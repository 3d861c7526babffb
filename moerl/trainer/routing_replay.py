"""Routing replay: the one moerl module that drives megatron-core's ``RouterReplay``.

Shape-suffix legend:
  B  samples in a micro-batch       T  padded sequence length ``seq_len`` (a multiple of tp)
  L  MoE layers (dense layers dropped), or all hidden layers on the wire (``L_all``)
  K  experts per token (top-k)      N  tokens this rank's routers see: ``T / tp * B``

Modes (:class:`ReplayMode`, DESIGN.md "Routing replay modes"):
  ``none``  natural routing in every pass.
  ``r2``    the old-logprob pass routes naturally and records (:meth:`RoutingReplay.record`); the
            training forward/backward replays those records (Ma et al. 2025, "Stabilizing MoE RL
            by aligning training and inference routers", R2 = "vanilla routing replay").
  ``r3``    the old-logprob and training passes replay the rollout engine's routes ("rollout
            routing replay" in the same paper; DeepSeek-V3.2's "keep routing").
The reference forward always routes naturally.

Upstream's own entry points do the per-layer work (megatron-core 0.16.1 and 0.19.2 have the same
``RouterReplay`` API): ``set_replay_data``, ``set_global_router_replay_action``,
``get_recorded_data``, ``clear_global_indices`` / ``clear_global_router_replay_action``. moerl adds
what upstream lacks: the session (one context per pass, cleared also on error), the SP gather,
checks of every route tensor, and, on 0.19, a check of each instance's ``layer_number`` against
the model's MoE layers (0.16's instances do not know their layer).

What replay means numerically (``RouterReplay.get_replay_topk``, the same in 0.16.1 and 0.19.2): the
experts are the given ones, the gate weights are recomputed from the trainer's own router scores
at those experts, so the router still receives gradients. With ``moe_router_pre_softmax=False``
(HF ``norm_topk_prob=True``) the scores are logits and the gate weights are the softmax over the
K replayed logits; with ``pre_softmax=True`` they are the full softmax's probabilities gathered at
the replayed experts, not renormalised, as HF does without ``norm_topk_prob``.

Where the routes go (verified token for token by ``tests/dist/replay_checks.py``): inside the
decoder hidden states are ``[s, b, h]``; under sequence parallelism TP rank ``r`` holds positions
``r*T/tp .. (r+1)*T/tp - 1`` and its router scores exactly those tokens, flattened s-major
(token ``i = s_local * B + b``), before the all-gather dispatcher gathers tokens across TP x EP.
So a rank's replay tensor for a layer is ``[T/tp * B, K]`` in that order, and nothing else.

Rollout routes arrive per sample in SGLang's layout ``[T_i - 1, L_all, K]``: the final token never
went through the rollout model, dense layers are rows of zeros. :func:`pack_routes_BTLK` drops
the dense layers and fills every position without a route (each sample's final token, the right
padding) with distinct valid ids: zeros would send a token to expert 0 K times, which the
dispatcher's routing map cannot represent (a token's row must name K distinct experts).

Natural top-k under replay (for the "routing agreement" telemetry in r3 arms): the
``RouterReplay`` instances are switched, by class swap, to :class:`_MoerlRouterReplay`, which under
``REPLAY_FORWARD`` also runs upstream's own top-k on the same scores (one extra ``topk`` over
``[N, E]`` per layer, no grad) and keeps the indices. These are the router's choices on the
replayed pass's own hidden states: the first MoE layer sees exactly what a natural pass sees,
later layers see the history the replayed routes produced (per-layer agreement given the same
input, which is what replay controls; a fully natural pass would cost a second forward). It
relies on the structure of upstream's
``get_replay_topk``; ``tests/test_routing_replay.py`` fails if that structure changes.

Activation recompute: a checkpointed layer runs its router twice, once in the forward (autograd
off) and again in the backward. Megatron serves the second run from ``replay_backward_list``
(``REPLAY_BACKWARD``), so the caller switches with :meth:`ReplayPass.switch_to_backward` before
``backward()``. On exit the context checks that each layer's backward recompute consumed exactly
the routes its checkpointed forwards pushed (a router call with autograd off in a pass that ends
in a backward is one a checkpoint recomputes), then clears every action and index, also on error.
"""

from __future__ import annotations

import contextlib
import enum
import functools
from dataclasses import dataclass

import torch
import torch.distributed as dist

from moerl.routes import route_dtype
from moerl.trainer import megatron_version
from moerl.trainer.model import MoEArchitecture
from moerl.trainer.parallel import ParallelLayout


class ReplayMode(enum.Enum):
    """Which routes the actor's passes use (DESIGN.md "Routing replay modes")."""

    NONE = "none"  # natural routing everywhere
    R2 = "r2"  # record in the old-logprob pass, replay those in the training pass
    R3 = "r3"  # replay the rollout engine's routes in the old-logprob and training passes


@dataclass(frozen=True)
class MegatronRoutes:
    """Routes laid out for this rank's routers, one tensor per MoE layer.

    ``per_layer[l]`` is int64 ``[T/tp * B, K]``: the sequence-parallel shard of this rank, tokens
    in Megatron's s-major order. ``batch_size`` and ``seq_len`` are the full micro-batch's.
    """

    per_layer: tuple[torch.Tensor, ...]
    batch_size: int
    seq_len: int


def padding_routes(num_rows: int, *, top_k: int, num_experts: int,
                   device: torch.device | str | None = None) -> torch.Tensor:
    """Routes for positions that have none: row ``p`` is ``(p*K + j) mod E`` for ``j < K``.

    The ids in a row are distinct (``K <= E``) and valid; consecutive rows rotate through the
    experts so padding tokens spread their (discarded) compute over all experts instead of piling
    onto the first K. Returns int32 ``[num_rows, K]``.
    """
    if top_k > num_experts:
        raise ValueError(f"top_k={top_k} exceeds num_experts={num_experts}")
    rows = torch.arange(num_rows, device=device, dtype=torch.int64).unsqueeze(1)
    cols = torch.arange(top_k, device=device, dtype=torch.int64)
    return ((rows * top_k + cols) % num_experts).to(torch.int32)


def pack_routes_BTLK(routes_per_sample: list[torch.Tensor], *, seq_len: int,
                     arch: MoEArchitecture) -> torch.Tensor:
    """Pack per-sample routes into a right-padded ``[B, T, L, K]`` over MoE layers only, in
    :func:`moerl.routes.route_dtype` (uint8 up to 256 experts).

    Each sample's routes are ``[t_i, L_all, K]`` (SGLang's wire layout, ``t_i = T_i - 1``; dense
    layers are dropped) or ``[t_i, L, K]`` (MoE layers only, e.g. routes recorded by the trainer
    for r2, ``t_i = T_i``). Position ``p`` carries the route of the token at position ``p``;
    positions ``t_i .. T-1`` get :func:`padding_routes`. Raises ValueError on routes that cannot
    be replayed: wrong layer count or K, too long, ids out of range, or a repeated id in a row.
    """
    if any(r is None for r in routes_per_sample):
        raise ValueError("routes are missing for some samples; replay needs routes for all or "
                         "none (request return_routed_experts for every sample)")
    moe_ids = arch.moe_layer_ids
    num_moe, top_k, num_experts = len(moe_ids), arch.top_k, arch.num_experts
    batch = len(routes_per_sample)
    pad_BT_LK = padding_routes(batch * seq_len, top_k=top_k, num_experts=num_experts)
    routes_BTLK = pad_BT_LK.view(batch, seq_len, 1, top_k).expand(-1, -1, num_moe, -1).to(
        route_dtype(num_experts))
    for i, routes in enumerate(routes_per_sample):
        if routes.dim() != 3 or routes.shape[2] != top_k:
            raise ValueError(f"sample {i}: routes must be [positions, layers, {top_k}], "
                             f"got {tuple(routes.shape)}")
        if routes.shape[1] == arch.num_layers:
            routes = routes[:, moe_ids]
        elif routes.shape[1] != num_moe:
            raise ValueError(f"sample {i}: routes have {routes.shape[1]} layers; expected all "
                             f"{arch.num_layers} hidden layers or the {num_moe} MoE layers")
        if routes.shape[0] > seq_len:
            raise ValueError(f"sample {i}: {routes.shape[0]} routed positions exceed "
                             f"seq_len={seq_len}")
        _check_route_ids(routes, num_experts=num_experts, what=f"sample {i}")
        routes_BTLK[i, : routes.shape[0]] = routes.to(routes_BTLK.dtype)
    return routes_BTLK


def _check_route_ids(routes_TLK: torch.Tensor, *, num_experts: int, what: str) -> None:
    if routes_TLK.numel() == 0:
        return
    if int(routes_TLK.min()) < 0 or int(routes_TLK.max()) >= num_experts:
        raise ValueError(f"{what}: expert ids must lie in [0, {num_experts}), got "
                         f"[{int(routes_TLK.min())}, {int(routes_TLK.max())}]")
    sorted_TLK = routes_TLK.sort(dim=-1).values
    if bool((sorted_TLK[..., 1:] == sorted_TLK[..., :-1]).any()):
        raise ValueError(f"{what}: a (position, layer) row repeats an expert id; routes of "
                         "dense layers must be dropped, not replayed")


def shard_routes(routes_BTLK: torch.Tensor, *, layout: ParallelLayout,
                 device: torch.device | str | None = None) -> MegatronRoutes:
    """This rank's :class:`MegatronRoutes` from full-batch routes ``[B, T, L, K]``.

    Megatron flattens hidden states ``[s, b]`` s-major and, under sequence parallelism, gives TP
    rank ``r`` the positions ``r*T/tp .. (r+1)*T/tp - 1``.
    """
    batch, seq_len, num_layers, top_k = routes_BTLK.shape
    if seq_len % layout.tp:
        raise ValueError(f"seq_len={seq_len} must be a multiple of parallel.tp={layout.tp} "
                         "(sequence parallelism splits positions evenly)")
    local = seq_len // layout.tp
    shard_bTLK = routes_BTLK[:, layout.tp_rank * local:(layout.tp_rank + 1) * local]
    shard_NLK = shard_bTLK.transpose(0, 1).reshape(local * batch, num_layers, top_k)
    # Cross to the device in the compact type, widen there: `.to(device, int64)` in one call
    # converts on the host first and copies 8x the bytes (Megatron's gather needs int64).
    shard_NLK = shard_NLK.to(device).to(torch.int64)
    per_layer = tuple(shard_NLK[:, l].contiguous() for l in range(num_layers))
    return MegatronRoutes(per_layer=per_layer, batch_size=batch, seq_len=seq_len)


def routes_to_megatron(routes_per_sample: list[torch.Tensor], *, seq_len: int,
                       arch: MoEArchitecture, layout: ParallelLayout,
                       device: torch.device | str | None = None) -> MegatronRoutes:
    """Per-sample routes (see :func:`pack_routes_BTLK`) -> this rank's replay tensors.

    Call it once per micro-batch, outside any timed region, with ``device`` the model's device
    (Megatron moves the indices to the scores' device on every router call otherwise).
    """
    return shard_routes(pack_routes_BTLK(routes_per_sample, seq_len=seq_len, arch=arch),
                        layout=layout, device=device)


def routing_agreement(routes_a_BTLK: torch.Tensor, routes_b_BTLK: torch.Tensor,
                      mask_BT: torch.Tensor) -> dict[str, torch.Tensor]:
    """How often two routings pick the same experts (the R3 paper's router/token mismatch).

    A (token, layer) agrees when both pick the same *set* of K experts (order-insensitive: the
    order of the top-k carries no meaning once gate weights are recomputed). Only positions with
    ``mask_BT`` set count. Returns detached 0-dim float tensors:
      ``route_agreement``        fraction of counted (token, layer) pairs that agree;
      ``token_route_mismatch``   fraction of counted tokens that differ in at least one layer;
      ``layer_agreement``        ``[L]``, the agreement of each MoE layer on its own.
    All are NaN when no position counts.
    """
    if routes_a_BTLK.shape != routes_b_BTLK.shape or routes_a_BTLK.dim() != 4:
        raise ValueError(f"routes must both be [B, T, L, K], got {tuple(routes_a_BTLK.shape)} "
                         f"and {tuple(routes_b_BTLK.shape)}")
    if mask_BT.shape != routes_a_BTLK.shape[:2]:
        raise ValueError(f"mask_BT has shape {tuple(mask_BT.shape)}, expected "
                         f"{tuple(routes_a_BTLK.shape[:2])}")
    return agreement_from_counts(routing_agreement_counts(routes_a_BTLK, routes_b_BTLK, mask_BT))


def routing_agreement_counts(routes_a_BTLK: torch.Tensor, routes_b_BTLK: torch.Tensor,
                             mask_BT: torch.Tensor) -> torch.Tensor:
    """The integer counts behind :func:`routing_agreement`, int64 ``[2 + L]``: counted tokens,
    tokens that differ in at least one layer, and per MoE layer the agreeing tokens. Counts of
    disjoint row sets add up (data-parallel ranks sum theirs before :func:`agreement_from_counts`).
    """
    same_BTL = (routes_a_BTLK.sort(dim=-1).values == routes_b_BTLK.sort(dim=-1).values).all(-1)
    same_NL = same_BTL[mask_BT.bool()]
    return torch.cat([torch.tensor([same_NL.shape[0], int((~same_NL.all(-1)).sum())]),
                      same_NL.sum(0, dtype=torch.int64)])


def agreement_from_counts(counts: torch.Tensor) -> dict[str, torch.Tensor]:
    """:func:`routing_agreement`'s fractions from :func:`routing_agreement_counts`."""
    num_tokens, per_layer = counts[0].double(), counts[2:].double()
    if int(counts[0]) == 0 or per_layer.numel() == 0:
        nan = torch.tensor(float("nan"))
        return {"route_agreement": nan, "token_route_mismatch": nan.clone(),
                "layer_agreement": torch.full((per_layer.numel(),), float("nan"))}
    return {"route_agreement": (per_layer.sum() / (num_tokens * per_layer.numel())).float(),
            "token_route_mismatch": (counts[1].double() / num_tokens).float(),
            "layer_agreement": (per_layer / num_tokens).float()}


def _router_replay_classes():
    # Imported on use: megatron takes seconds to import, and the pure helpers above (packing,
    # agreement) serve the batch and telemetry code where no model exists.
    from megatron.core.transformer.moe.router_replay import RouterReplay, RouterReplayAction

    return RouterReplay, RouterReplayAction


@functools.cache
def _moerl_router_replay_class():
    RouterReplay, Action = _router_replay_classes()

    class _MoerlRouterReplay(RouterReplay):
        """Upstream's ``RouterReplay`` plus: the natural top-k under ``REPLAY_FORWARD``, counts
        of checkpointed forwards and backward recomputes, and clear errors on misfit routes.

        Installed by class swap on the instances the model built (they are created inside
        ``TopKRouter.__init__``), so upstream's ``topk_routing_with_score_function`` calls it
        unchanged. Attributes are initialised by :meth:`moerl_reset`.
        """

        def moerl_reset(self) -> None:
            self.moerl_capture_natural = False
            self.moerl_natural_idx: torch.Tensor | None = None
            self.moerl_checkpointed_forwards = 0  # REPLAY_FORWARD calls with autograd off
            self.moerl_backward_replays = 0

        def get_replay_topk(self, scores, topk, num_groups=None, group_topk=None,
                            default_compute_topk=None):
            action = self.router_replay_action
            if action == Action.REPLAY_FORWARD:
                _check_fits(self.target_topk_idx, scores, topk)
                if not torch.is_grad_enabled():
                    self.moerl_checkpointed_forwards += 1
                if self.moerl_capture_natural:
                    with torch.no_grad():
                        _, natural = default_compute_topk(
                            scores.detach(), topk, num_groups=num_groups, group_topk=group_topk)
                    self.moerl_natural_idx = natural
            elif action == Action.REPLAY_BACKWARD:
                if not self.replay_backward_list:
                    raise RuntimeError(
                        "backward recompute asked for replayed routes but none are left: each "
                        "replay context covers one forward and one backward of one micro-batch")
                _check_fits(self.replay_backward_list[0], scores, topk)
                self.moerl_backward_replays += 1
            return super().get_replay_topk(scores, topk, num_groups, group_topk,
                                           default_compute_topk)

    return _MoerlRouterReplay


def _check_layer_numbers(instances: list, arch: MoEArchitecture) -> None:
    """From megatron-core 0.19 each ``RouterReplay`` knows its layer's 1-based ``layer_number``:
    check that the instances are this model's MoE layers in order (replay relies on it)."""
    if not megatron_version.at_least(0, 19):
        return  # 0.16's RouterReplay does not know its layer; the count check is all there is
    found = [router.layer_number for router in instances]
    expected = [layer + 1 for layer in arch.moe_layer_ids]
    if found != expected:
        raise ValueError(f"RouterReplay instances belong to layers {found} (1-based), but the "
                         f"model's MoE layers are {expected}: the model was built with other "
                         "MoE layers than its HF config says, or with pipeline parallelism, "
                         "which routing replay does not support")


def _check_fits(target: torch.Tensor | None, scores: torch.Tensor, topk: int) -> None:
    if target is None:
        raise RuntimeError("a router is in replay mode without routes to replay")
    if target.shape != (scores.shape[0], topk):
        raise ValueError(
            f"replayed routes are {tuple(target.shape)} but the router scores {scores.shape[0]} "
            f"tokens with top-{topk}: the routes were sliced for another batch size, seq_len or "
            "tensor-parallel rank")


@dataclass
class RecordedRoutes:
    """Yielded by :meth:`RoutingReplay.record`; filled when the context exits normally."""

    # int32 [B, T, L, K], gathered across sequence-parallel ranks: the trainer's natural routes.
    routes_BTLK: torch.Tensor | None = None


@dataclass
class ReplayPass:
    """Yielded by :meth:`RoutingReplay.replay`."""

    _owner: "RoutingReplay"
    routes: MegatronRoutes
    # int32 [B, T, L, K] gathered across SP ranks: the experts the trainer's routers would have
    # picked (with capture_natural); filled when the context exits normally.
    natural_routes_BTLK: torch.Tensor | None = None
    in_backward: bool = False

    def switch_to_backward(self) -> None:
        """Call after the forward, before ``backward()``: recomputed layers pop the routes their
        checkpointed forward used (``REPLAY_BACKWARD``) instead of routing anew."""
        RouterReplay, Action = _router_replay_classes()
        RouterReplay.set_global_router_replay_action(Action.REPLAY_BACKWARD)
        self.in_backward = True


class RoutingReplay:
    """Drives the ``RouterReplay`` instances of the one routing-replay model in this process.

    The actor and the reference share one Megatron model (weights are swapped), so there is one
    instance per MoE layer of this rank, in layer order. Outside :meth:`record` and
    :meth:`replay` every router routes naturally.
    """

    def __init__(self, arch: MoEArchitecture, layout: ParallelLayout, *,
                 tp_group: dist.ProcessGroup | None) -> None:
        RouterReplay, _ = _router_replay_classes()
        instances = RouterReplay.global_router_replay_instances
        num_moe = len(arch.moe_layer_ids)
        if len(instances) != num_moe:
            raise ValueError(
                f"{len(instances)} RouterReplay instances exist in this process but the model has "
                f"{num_moe} MoE layers: a second model with routing replay was built in this "
                "process (build other models with moe_enable_routing_replay=False, or call "
                "RouterReplay.clear_global_router_replay_instances() before building), or the "
                "model was built without moe_enable_routing_replay")
        _check_layer_numbers(instances, arch)
        self.arch, self.layout, self.tp_group = arch, layout, tp_group
        self._routers = list(instances)
        replay_cls = _moerl_router_replay_class()
        for router in self._routers:
            router.__class__ = replay_cls
            router.moerl_reset()
        self._active = False

    @contextlib.contextmanager
    def record(self, *, batch_size: int, seq_len: int):
        """Route naturally and record; the handle's ``routes_BTLK`` is set on exit."""
        RouterReplay, Action = _router_replay_classes()
        handle = RecordedRoutes()
        with self._session():
            RouterReplay.set_global_router_replay_action(Action.RECORD)
            yield handle
            handle.routes_BTLK = self._gather_BTLK(
                RouterReplay.get_recorded_data(), batch_size=batch_size, seq_len=seq_len,
                what="recorded")

    @contextlib.contextmanager
    def replay(self, routes: MegatronRoutes, *, capture_natural: bool = False):
        """Route every MoE layer to ``routes`` for one forward (and its backward).

        With ``capture_natural`` the handle's ``natural_routes_BTLK`` holds the routes the
        trainer would have chosen. Call ``switch_to_backward()`` on the handle before
        ``backward()``. Routes on another device than the model's are moved once here, all layers
        in one copy (Megatron would otherwise copy on every router call, each a host sync).
        """
        RouterReplay, Action = _router_replay_classes()
        if len(routes.per_layer) != len(self._routers):
            raise ValueError(f"routes cover {len(routes.per_layer)} MoE layers, the model has "
                             f"{len(self._routers)}")
        per_layer = routes.per_layer
        device = (torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available()
                  else torch.device("cpu"))
        if per_layer and per_layer[0].device != device:
            per_layer = torch.stack(per_layer).to(device).unbind(0)
        handle = ReplayPass(self, routes)
        with self._session():
            RouterReplay.set_replay_data(list(per_layer))
            for router in self._routers:
                router.moerl_capture_natural = capture_natural
            RouterReplay.set_global_router_replay_action(Action.REPLAY_FORWARD)
            yield handle
            if handle.in_backward:
                self._check_consumed()
            if capture_natural:
                handle.natural_routes_BTLK = self._gather_BTLK(
                    [router.moerl_natural_idx for router in self._routers],
                    batch_size=routes.batch_size, seq_len=routes.seq_len, what="natural")

    @contextlib.contextmanager
    def _session(self):
        RouterReplay, _ = _router_replay_classes()
        if self._active:
            raise RuntimeError("routing replay contexts do not nest")
        if RouterReplay.global_router_replay_instances != self._routers:
            raise RuntimeError("RouterReplay's global instances changed since RoutingReplay was "
                               "built: a second model with routing replay was built")
        self._active = True
        try:
            yield
        finally:
            RouterReplay.clear_global_router_replay_action()
            RouterReplay.clear_global_indices()
            for router in self._routers:
                router.moerl_reset()
            self._active = False

    def _check_consumed(self) -> None:
        problems = [
            f"MoE layer {i}: {r.moerl_checkpointed_forwards} checkpointed forward(s), "
            f"{r.moerl_backward_replays} backward recompute(s), "
            f"{len(r.replay_backward_list)} route tensor(s) left"
            for i, r in enumerate(self._routers)
            if r.moerl_backward_replays != r.moerl_checkpointed_forwards
            or (r.moerl_checkpointed_forwards and r.replay_backward_list)]
        assert not problems, ("replayed routes were not consumed by the backward recompute "
                              "(backward not run, or run on part of the graph): "
                              + "; ".join(problems))

    def _gather_BTLK(self, per_layer: list[torch.Tensor | None], *, batch_size: int,
                     seq_len: int, what: str) -> torch.Tensor:
        """Stack this rank's ``[N, K]`` per layer and all-gather the SP shards into ``[B, T, L, K]``."""
        if any(idx is None for idx in per_layer):
            raise RuntimeError(f"no {what} routes: the model's forward did not run in the context")
        local_NLK = torch.stack(per_layer, dim=1).to(torch.int32)
        local = seq_len // self.layout.tp
        if local_NLK.shape[0] != local * batch_size:
            raise ValueError(f"{what} routes cover {local_NLK.shape[0]} tokens, expected "
                             f"seq_len/tp * batch_size = {local} * {batch_size}")
        if self.layout.tp > 1:
            shards = [torch.empty_like(local_NLK) for _ in range(self.layout.tp)]
            dist.all_gather(shards, local_NLK, group=self.tp_group)
            local_NLK = torch.cat(shards, dim=0)
        routes_TBLK = local_NLK.view(seq_len, batch_size, *local_NLK.shape[1:])
        return routes_TBLK.transpose(0, 1).contiguous()
