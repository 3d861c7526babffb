"""The policy on this rank: one Megatron MoE model that is the actor, and the reference by swap.

Megatron's ``RouterReplay`` keeps a process-global list of routers, so a second MoE model in the
process would break replay bookkeeping; the reference policy therefore lives as a frozen copy of
the weights that :meth:`Actor.reference_weights` swaps in for the reference forward.

Every pass runs in micro-batches of whole samples, each trimmed to its own longest sequence
(rounded up to the tensor-parallel size for sequence parallelism). Which routes each pass uses:

    pass          none              r2                          r3
    reference     natural           natural                     natural
    old logprobs  natural, recorded natural, recorded (kept)    rollout's, natural captured
    training      natural           replay recorded             replay rollout's

The recorded/captured natural routes are the trainer's own choices, kept for the routing
agreement telemetry in every mode.

Shape legend: B samples, T padded length, N = B*T flattened tokens, V vocab shard, L MoE layers,
K experts per token.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import torch

from moerl.batch import RolloutBatch
from moerl.routes import route_dtype
from moerl.trainer.hf_bridge import export_hf_weights, load_hf_weights, save_hf_checkpoint
from moerl.trainer.logprobs import vocab_parallel_entropy, vocab_parallel_logprobs
from moerl.trainer.model import MoEArchitecture, build_gpt_model
from moerl.trainer.optimizer import build_optimizer
from moerl.trainer.parallel import ParallelLayout, ProcessGroups
from moerl.trainer.routing_replay import ReplayMode, RoutingReplay, padding_routes, shard_routes

LossFn = Callable[[RolloutBatch, torch.Tensor, torch.Tensor | None],
                  tuple[torch.Tensor, dict[str, torch.Tensor]]]


@dataclass(frozen=True)
class PassSettings:
    """How the actor turns logits into log-probs (scalars from the rollout/algorithm config)."""

    temperature: float
    keep_sampling_mask: bool
    replay: ReplayMode
    micro_batch_size: int

    @classmethod
    def from_config(cls, cfg) -> "PassSettings":
        """From a ``moerl.config.Config``: rollout temperature, keep-mask, replay, micro-batch."""
        return cls(temperature=cfg.rollout.temperature,
                   keep_sampling_mask=cfg.algorithm.keep_sampling_mask,
                   replay=ReplayMode(cfg.algorithm.routing_replay),
                   micro_batch_size=cfg.training.micro_batch_size)


class Actor:
    def __init__(self, *, arch: MoEArchitecture, layout: ParallelLayout, groups: ProcessGroups,
                 hf_path: str, ref_path: str, bf16: bool, recompute: bool,
                 token_dispatcher: str | None, optim: dict, fp16: bool = False):
        self.arch, self.layout, self.groups = arch, layout, groups
        self.hf_path = hf_path
        model = build_gpt_model(arch, layout, bf16=bf16, recompute=recompute,
                                token_dispatcher=token_dispatcher, fp16=fp16)
        if ref_path and ref_path != hf_path:
            load_hf_weights(model, ref_path, arch, layout)
            self._ref_weights = [p.detach().clone() for p in model.parameters()]
            load_hf_weights(model, hf_path, arch, layout)
        else:
            load_hf_weights(model, hf_path, arch, layout)
            self._ref_weights = [p.detach().clone() for p in model.parameters()]
        self.optimizer = build_optimizer(model, layout, groups, **optim)
        self.model = self.optimizer.model  # the DDP-wrapped module that forward() must go through
        self.replay = RoutingReplay(arch, layout, tp_group=groups.tp)
        # Batches live on the host; each micro-batch visits the model's device.
        self.device = next(model.parameters()).device

    # ------------------------------------------------------------------ forward pieces

    def _micro_batches(self, rows: torch.Tensor, size: int) -> Iterator[torch.Tensor]:
        for start in range(0, len(rows), size):
            yield rows[start:start + size]

    def _logprobs(self, mb: RolloutBatch, settings: PassSettings, *, entropy: bool,
                  mask_on: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Forward ``mb`` (inside whatever routing context is active) -> ``[B, T]`` log-probs."""
        b, t = mb.tokens_BT.shape
        positions_BT = torch.arange(t, device=mb.tokens_BT.device).expand(b, t)
        logits_BTV = self.model(mb.tokens_BT, positions_BT, None)
        logits_NV = logits_BTV.reshape(b * t, -1)
        kept = {}
        if mask_on and mb.kept_offsets_N1 is not None:
            kept = {"kept_ids_M": mb.kept_ids_M, "kept_offsets_N1": mb.kept_offsets_N1}
        logprobs_N = vocab_parallel_logprobs(logits_NV, mb.targets_BT.reshape(-1),
                                             tp_group=self.groups.tp,
                                             temperature=settings.temperature,
                                             vocab_size=self.arch.vocab_size, **kept)
        entropy_N = (vocab_parallel_entropy(logits_NV, tp_group=self.groups.tp,
                                            temperature=settings.temperature,
                                            vocab_size=self.arch.vocab_size)
                     if entropy else None)
        return logprobs_N.view(b, t), None if entropy_N is None else entropy_N.view(b, t)

    def _routes_for(self, mb: RolloutBatch, mode: ReplayMode, *, training: bool):
        if mode == ReplayMode.R3 or (mode == ReplayMode.R2 and training):
            routes_BTLK = mb.routes_BTLK if mode == ReplayMode.R3 else mb.trainer_routes_BTLK
            if routes_BTLK is None:
                raise ValueError(f"routing replay {mode.value} needs "
                                 f"{'rollout routes (return_routed_experts)' if mode == ReplayMode.R3 else 'routes recorded in the old-logprob pass'}")
            return shard_routes(routes_BTLK, layout=self.layout, device=self.device)
        return None

    # ------------------------------------------------------------------ no-grad passes

    @torch.no_grad()
    def compute_old_logprobs(self, batch: RolloutBatch, rows: torch.Tensor,
                             settings: PassSettings) -> torch.Tensor:
        """Fill ``old_logprobs_BT`` and ``trainer_routes_BTLK`` (natural routes) for ``rows``;
        returns the full-vocabulary entropy ``[B, T]`` of those rows (0 elsewhere)."""
        self.model.eval()
        b_all, t_all = batch.tokens_BT.shape
        if batch.old_logprobs_BT is None:
            batch.old_logprobs_BT = torch.zeros(b_all, t_all)
        if batch.trainer_routes_BTLK is None:  # a heavy field: this rank's rows only
            num_moe, k = len(self.arch.moe_layer_ids), self.arch.top_k
            b_heavy = batch.num_heavy_rows
            pad = padding_routes(b_heavy * t_all, top_k=k, num_experts=self.arch.num_experts)
            batch.trainer_routes_BTLK = pad.view(b_heavy, t_all, 1, k).expand(
                -1, -1, num_moe, -1).to(route_dtype(self.arch.num_experts))
        entropy_BT = torch.zeros(b_all, t_all)
        for mb_rows in self._micro_batches(rows, settings.micro_batch_size):
            mb = batch.select(mb_rows, pad_multiple=self.layout.tp).to(self.device)
            routes = self._routes_for(mb, settings.replay, training=False)
            if routes is None:
                ctx = self.replay.record(batch_size=mb.batch_size, seq_len=mb.seq_len)
            else:
                ctx = self.replay.replay(routes, capture_natural=True)
            with ctx as handle:
                logprobs, entropy = self._logprobs(mb, settings, entropy=True,
                                                   mask_on=settings.keep_sampling_mask)
            natural = handle.routes_BTLK if routes is None else handle.natural_routes_BTLK
            width = mb.seq_len
            batch.old_logprobs_BT[mb_rows, :width] = logprobs.float().cpu()
            batch.trainer_routes_BTLK[batch.heavy_index(mb_rows), :width] = natural.cpu().to(
                batch.trainer_routes_BTLK.dtype)
            entropy_BT[mb_rows, :width] = entropy.float().cpu()
        return entropy_BT

    @torch.no_grad()
    def compute_ref_logprobs(self, batch: RolloutBatch, rows: torch.Tensor,
                             settings: PassSettings) -> None:
        """Fill ``ref_logprobs_BT`` for ``rows``: reference weights, natural routing. The sampling
        mask applies as for the policy, so the KL compares distributions on the same support."""
        self.model.eval()
        if batch.ref_logprobs_BT is None:
            batch.ref_logprobs_BT = torch.zeros(batch.tokens_BT.shape)
        with self.reference_weights():
            for mb_rows in self._micro_batches(rows, settings.micro_batch_size):
                mb = batch.select(mb_rows, pad_multiple=self.layout.tp).to(self.device)
                logprobs, _ = self._logprobs(mb, settings, entropy=False,
                                             mask_on=settings.keep_sampling_mask)
                batch.ref_logprobs_BT[mb_rows, :mb.seq_len] = logprobs.float().cpu()

    # ------------------------------------------------------------------ training

    def train_step(self, batch: RolloutBatch, rows: torch.Tensor, settings: PassSettings,
                   loss_fn: LossFn, *, with_entropy: bool, mask_on: bool | None = None,
                   extra: tuple[RolloutBatch, LossFn] | None = None):
        """One optimizer step on ``rows`` (this rank's part of a mini-batch) in micro-batches.

        ``loss_fn(mb, logprobs_BT, entropy_BT)`` returns this micro-batch's share of the
        mini-batch loss (global denominators) and detached metrics. ``extra`` is a second batch
        with its own loss function that joins the same optimizer step (PPO-ptx's pretraining
        batch: full vocabulary, natural routing). Returns ``(StepResult, metrics averaged over
        micro-batches)``.
        """
        self.model.train()
        self.optimizer.zero_grad()
        mask_on = settings.keep_sampling_mask if mask_on is None else mask_on
        totals: dict[str, torch.Tensor] = {}
        count = 0
        if extra is not None:
            extra_batch, extra_loss_fn = extra
            plain = PassSettings(temperature=1.0, keep_sampling_mask=False,
                                 replay=ReplayMode.NONE,
                                 micro_batch_size=settings.micro_batch_size)
            for mb_rows in self._micro_batches(torch.arange(extra_batch.batch_size),
                                               settings.micro_batch_size):
                mb = extra_batch.select(mb_rows, pad_multiple=self.layout.tp).to(self.device)
                logprobs, _ = self._logprobs(mb, plain, entropy=False, mask_on=False)
                loss, metrics = extra_loss_fn(mb, logprobs, None)
                self.optimizer.scale_loss(loss).backward()
                for key, value in metrics.items():
                    totals[key] = totals.get(key, 0.0) + value.detach().float()
        for mb_rows in self._micro_batches(rows, settings.micro_batch_size):
            mb = batch.select(mb_rows, pad_multiple=self.layout.tp).to(self.device)
            routes = self._routes_for(mb, settings.replay, training=True)
            ctx = (self.replay.replay(routes) if routes is not None
                   else contextlib.nullcontext())
            with ctx as handle:
                logprobs, entropy = self._logprobs(mb, settings, entropy=with_entropy,
                                                   mask_on=mask_on)
                loss, metrics = loss_fn(mb, logprobs, entropy)
                if handle is not None:
                    handle.switch_to_backward()
                self.optimizer.scale_loss(loss).backward()
            for key, value in metrics.items():
                totals[key] = totals.get(key, 0.0) + value.detach().float()
            totals["loss"] = totals.get("loss", 0.0) + loss.detach().float()
            if entropy is not None:
                mask = mb.response_mask_BT
                totals["entropy"] = totals.get("entropy", 0.0) + (
                    (entropy.detach() * mask).sum() / mask.sum().clamp(min=1))
            count += 1
        result = self.optimizer.step()
        # Losses are sums of shares, the rest are per-micro-batch means.
        metrics = {k: (v if "loss" in k else v / max(count, 1)) for k, v in totals.items()}
        return result, metrics

    # ------------------------------------------------------------------ weights

    @contextlib.contextmanager
    def reference_weights(self):
        """Swap the frozen reference weights into the model for the duration of the block."""
        params = list(self.model.module.parameters()) if hasattr(self.model, "module") else list(
            self.model.parameters())
        with torch.no_grad():
            for p, ref in zip(params, self._ref_weights):
                tmp = p.detach().clone()
                p.copy_(ref)
                ref.copy_(tmp)
            try:
                yield
            finally:
                for p, ref in zip(params, self._ref_weights):
                    tmp = p.detach().clone()
                    p.copy_(ref)
                    ref.copy_(tmp)

    def export_hf(self, dtype: torch.dtype | None = None) -> Iterator[tuple[str, torch.Tensor]]:
        """HF-named full tensors (collective: every rank iterates)."""
        return export_hf_weights(self.model, self.arch, self.layout, groups=self.groups,
                                 dtype=dtype)

    def save_hf(self, out_dir: str | Path) -> None:
        save_hf_checkpoint(self.model, self.arch, self.layout, self.groups, out_dir, self.hf_path)

    def save(self, path: str | Path) -> Path:
        """This rank's weights and optimizer state (collective); the file written. The reference
        weights are not saved: they are re-read from ``ref_path`` (or are the initial weights)
        on resume."""
        return self.optimizer.save(path)

    def load(self, path: str | Path) -> None:
        self.optimizer.load(path)
