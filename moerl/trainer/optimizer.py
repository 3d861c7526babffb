"""AdamW for the Megatron trainer: Megatron DDP + Megatron's optimizer, and a step that never
applies a non-finite gradient.

Why not a plain ``torch.optim.AdamW(model.parameters())``: Megatron DDP accumulates gradients into
``param.main_grad`` (fp32 buffers it reduces across data-parallel ranks) and leaves ``param.grad``
empty, so a torch optimizer on the wrapped model would silently change nothing. Megatron's own
optimizer reads ``main_grad``; :class:`TrainerOptimizer` drives it:

    opt.zero_grad()                       # DDP grad buffers and optimizer grads
    loss.backward()                       # once or per micro-batch (grads accumulate)
    result = opt.step()                   # finalize_model_grads, global norm, clip, AdamW update

Conventions (where Megatron leaves a choice open):

- AdamW, decoupled weight decay (Loshchilov & Hutter, 2019): Megatron's ``optimizer="adam"``
  with ``decoupled_weight_decay=True`` (its default) builds ``torch.optim.AdamW`` on CPU and
  Apex/TE ``FusedAdam(adam_w_mode=True)`` on GPU. Megatron's default parameter groups exempt 1-D
  parameters (norms, QK-norms) and biases from weight decay; the scheduler applies that.
- Data-parallel reduction: Megatron DDP *sums* gradients over data-parallel replicas when the
  model config has ``calculate_per_token_loss`` (``moerl.trainer.model`` sets it, because moerl's
  losses are divided by global, all-rank denominators) and averages them (1/dp) otherwise.
  ``finalize_model_grads`` is called without ``num_tokens``, so nothing rescales them after.
- ``grad_norm`` is the L2 norm of the whole model's gradient before clipping: Megatron's
  ChainedOptimizer combines the dense optimizer's norm (reduced over TP, TP duplicates counted
  once) and the expert optimizer's (reduced over expert-TP x EP).
- Non-finite gradients: Megatron only checks for inf/nan when a loss scaler exists (fp16); in
  fp32 and bf16 it would clip by a nan norm (a no-op) and write nan into every weight. Here a
  non-finite norm on any rank skips the update on all ranks, leaving weights, Adam moments, step
  counters and the learning-rate schedule untouched, and the result says so.
- Learning rate: constant with optional linear warmup, through Megatron's
  ``OptimizerParamScheduler``. Update ``n`` (1-based, skipped steps not counted) uses
  ``lr * min(1, n / warmup_steps)``, so the first update already moves the weights.
- fp16 (GPU): Megatron's dynamic loss scaler. ``prepare_grads`` unscales the gradients, checks
  them and updates the scale; an overflow then skips the step here like any non-finite gradient.
- On CPU, only fp32 with the plain (non-distributed) optimizer: megatron-core's (0.16.1 and 0.19.2)
  mixed-precision and distributed optimizers require CUDA tensor types (see
  :func:`build_optimizer`). Both work unchanged on GPU.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist

from moerl.trainer.model import param_dtype
from moerl.trainer.parallel import ParallelLayout, ProcessGroups


@dataclass(frozen=True)
class StepResult:
    """Outcome of one :meth:`TrainerOptimizer.step`."""

    ok: bool  # the weights were updated
    grad_norm: float  # global L2 gradient norm before clipping (nan/inf when that caused a skip)
    lr: float  # learning rate of this update (0.0 when skipped)
    skipped_reason: str | None = None


class TrainerOptimizer:
    """Megatron DDP model + Megatron AdamW + warmup schedule, with exact save/resume.

    ``model`` is the DDP-wrapped module: run forward passes through it.
    """

    def __init__(self, model, megatron_optimizer, scheduler, *, clip_grad: float,
                 groups: ProcessGroups, layout: ParallelLayout,
                 loss_scaling: bool = False) -> None:
        self.model = model
        self.loss_scaling = loss_scaling
        self.megatron_optimizer = megatron_optimizer
        self.scheduler = scheduler
        self.clip_grad = clip_grad
        self.groups = groups
        self.layout = layout
        self.num_updates = 0

    @property
    def _parts(self) -> list:
        """The per-parameter-group-kind optimizers (dense, expert) inside the chain."""
        return getattr(self.megatron_optimizer, "chained_optimizers", [self.megatron_optimizer])

    def scale_loss(self, loss: torch.Tensor) -> torch.Tensor:
        """The loss to call ``backward`` on: times the current fp16 loss scale, else unchanged
        (Megatron's fp32 optimizer keeps its unit scale as a CUDA tensor, so it is not used)."""
        if not self.loss_scaling:
            return loss
        return loss * self.megatron_optimizer.get_loss_scale().to(loss.device)

    def zero_grad(self) -> None:
        """Zero DDP's ``main_grad`` buffers and the optimizer's ``.grad`` (call before backward)."""
        self.model.zero_grad_buffer()
        self.megatron_optimizer.zero_grad()

    @torch.no_grad()
    def step(self) -> StepResult:
        """Finalize gradients (DP / sequence-parallel reductions), then clip and update, or skip.

        Collective over the world: every rank must call it.
        """
        from megatron.core.distributed import finalize_model_grads
        from megatron.core.optimizer import optimizer as moptimizer

        finalize_model_grads([self.model])
        opt = self.megatron_optimizer
        found_inf = opt.prepare_grads()  # main_grad -> .grad (and fp16 unscale, if ever used)
        grad_norm = float(opt.get_grad_norm())
        # On the communication device of the world group (NCCL needs CUDA tensors).
        device = torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() \
            else torch.device("cpu")
        bad = torch.tensor([float(found_inf or not math.isfinite(grad_norm))], device=device)
        dist.all_reduce(bad, op=dist.ReduceOp.MAX, group=self.groups.world)
        if bad.item() > 0:
            return StepResult(ok=False, grad_norm=grad_norm, lr=0.0,
                              skipped_reason=f"non-finite gradient (global norm {grad_norm})")
        # Upstream's ChainedOptimizer.step minus its unconditional update: same clip coefficient
        # max_norm / (norm + 1e-6) for every part. The module attribute is looked up at call time
        # so that the CPU patch of clip_grad_by_total_norm_fp32 applies.
        for part in self._parts:
            params = part.get_parameters()
            if params and self.clip_grad > 0.0:
                moptimizer.clip_grad_by_total_norm_fp32(
                    params, max_norm=self.clip_grad, total_norm=grad_norm,
                    use_decoupled_grad=part.config.use_precision_aware_optimizer_no_fp8_or_ds_fp8)
        self.scheduler.step(1)  # lr and weight decay of update num_updates + 1, on every group
        lr = opt.param_groups[0]["lr"]
        opt.step_with_ready_grads()
        self.num_updates += 1
        return StepResult(ok=True, grad_norm=grad_norm, lr=lr)

    def state_dict(self) -> dict:
        """This rank's optimizer state: tensors and plain values only (``torch.save``-able).

        Per part (dense, expert): the inner torch optimizer's ``state_dict()`` (Adam moments,
        step counts, group hyper-parameters) and the main weights it updates: the fp32 masters
        with bf16, this rank's shards with the distributed optimizer, the model weights in fp32.
        One format for every variant, exact, per rank: resume needs the same parallel layout.
        """
        parts = []
        for part in self._parts:
            inner = part.optimizer
            parts.append(None if inner is None else {
                "inner": inner.state_dict(),
                "main_params": [p.detach().clone()
                                for g in inner.param_groups for p in g["params"]],
            })
        return {"parts": parts, "scheduler": self.scheduler.state_dict(),
                "num_updates": self.num_updates}

    @torch.no_grad()
    def load_state_dict(self, state: dict) -> None:
        """Inverse of :meth:`state_dict`, for an optimizer built on the same layout."""
        if len(state["parts"]) != len(self._parts):
            raise ValueError(f"optimizer state has {len(state['parts'])} parts, this optimizer "
                             f"{len(self._parts)} (the dense/expert split differs)")
        for i, (part, saved) in enumerate(zip(self._parts, state["parts"])):
            inner = part.optimizer
            if (inner is None) != (saved is None):
                raise ValueError(f"optimizer part {i}: saved and current parameters differ")
            if inner is None:
                continue
            mains = [p for g in inner.param_groups for p in g["params"]]
            shapes = [tuple(p.shape) for p in mains]
            if shapes != [tuple(t.shape) for t in saved["main_params"]]:
                raise ValueError(f"optimizer part {i}: saved main-weight shapes differ from this "
                                 "model's (different model or parallel layout)")
            for p, t in zip(mains, saved["main_params"]):
                p.copy_(t)
            inner.load_state_dict(saved["inner"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.num_updates = int(state["num_updates"])

    def save(self, path: str | Path) -> Path:
        """Write this rank's weights and optimizer state to ``path/rank_<rank>.pt`` (collective)."""
        out = Path(path)
        out.mkdir(parents=True, exist_ok=True)
        weights = {name: p.detach().to("cpu", copy=True)
                   for name, p in self.model.module.named_parameters()}
        file = out / f"rank_{self.layout.rank:05d}.pt"
        torch.save({"model": weights, "optimizer": self.state_dict()}, file)
        dist.barrier(group=self.groups.world)
        return file

    @torch.no_grad()
    def load(self, path: str | Path) -> None:
        """Restore what :meth:`save` wrote, for the same layout (collective).

        Loaded with ``weights_only=True``: the files hold tensors and plain values only.
        """
        file = Path(path) / f"rank_{self.layout.rank:05d}.pt"
        state = torch.load(file, weights_only=True, map_location="cpu")
        params = dict(self.model.module.named_parameters())
        if set(state["model"]) != set(params):
            raise ValueError(f"{file} does not match the model: differing parameters "
                             f"{sorted(set(state['model']) ^ set(params))[:12]}")
        for name, param in params.items():
            param.copy_(state["model"][name])
        # After the weights: the optimizer state carries the fp32 main weights (bf16 training),
        # which must win over the rounded model weights.
        self.load_state_dict(state["optimizer"])


def build_optimizer(model: torch.nn.Module, layout: ParallelLayout, groups: ProcessGroups, *,
                    lr: float, weight_decay: float = 0.0, adam_beta1: float = 0.9,
                    adam_beta2: float = 0.999, adam_eps: float = 1e-8, clip_grad: float = 1.0,
                    warmup_steps: int = 0, bf16: bool = False,
                    use_distributed_optimizer: bool = False,
                    fp16: bool = False) -> TrainerOptimizer:
    """Wrap ``model`` (a Megatron GPTModel with weights loaded) in DDP and build AdamW for it.

    Load weights before calling this: mixed-precision and distributed optimizers copy the model
    weights into their fp32 main weights here. ``fp16`` uses Megatron's dynamic loss scaling,
    started at 2^16 (PyTorch AMP's default; Megatron's 2^32 would skip ~17 RL updates before the
    first one lands), halved on overflow, doubled after 1000 clean steps: backward passes go
    through :meth:`TrainerOptimizer.scale_loss`, and a step whose scaled gradients overflowed is
    skipped (Megatron has already lowered the scale).
    """
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig
    from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer
    from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler

    if lr <= 0.0:
        raise ValueError(f"optimizer.lr must be > 0, got {lr}")
    if warmup_steps < 0:
        raise ValueError(f"optimizer.warmup_steps must be >= 0, got {warmup_steps}")
    if clip_grad < 0.0:
        raise ValueError(f"optimizer.clip_grad must be >= 0 (0 disables clipping), got {clip_grad}")
    if not torch.cuda.is_available() and (bf16 or fp16 or use_distributed_optimizer):
        # megatron-core (0.16.1, 0.19.2) sorts the parameters of its mixed-precision and distributed
        # optimizers by param.type() == "torch.cuda.{Float,BFloat16,Half}Tensor" and raises
        # TypeError for CPU tensors; moerl.trainer.cpu_compat does not patch that.
        raise ValueError("optimizer bf16=True, fp16=True and use_distributed_optimizer=True need "
                         "CUDA (megatron-core checks for CUDA tensor types); on CPU use fp32 "
                         "(model.dtype=float32) and the plain optimizer")
    ddp = DistributedDataParallel(
        config=model.config,
        ddp_config=DistributedDataParallelConfig(
            grad_reduce_in_fp32=True, overlap_grad_reduce=False,
            use_distributed_optimizer=use_distributed_optimizer),
        module=model)
    config = OptimizerConfig(
        optimizer="adam", lr=lr, min_lr=lr, weight_decay=weight_decay, adam_beta1=adam_beta1,
        adam_beta2=adam_beta2, adam_eps=adam_eps, clip_grad=clip_grad, bf16=bf16, fp16=fp16,
        params_dtype=param_dtype(bf16=bf16, fp16=fp16),
        use_distributed_optimizer=use_distributed_optimizer, decoupled_weight_decay=True,
        **({"initial_loss_scale": 2.0**16} if fp16 else {}))
    optimizer = get_megatron_optimizer(config, [ddp])
    # Megatron's scheduler: warmup from 0, then constant; weight decay constant, times each
    # group's wd_mult (0 for norms and biases). lr_decay_steps only has to exceed the warmup.
    scheduler = OptimizerParamScheduler(
        optimizer, init_lr=0.0, max_lr=lr, min_lr=lr, lr_warmup_steps=warmup_steps,
        lr_decay_steps=warmup_steps + 1, lr_decay_style="constant", start_wd=weight_decay,
        end_wd=weight_decay, wd_incr_steps=1, wd_incr_style="constant")
    return TrainerOptimizer(ddp, optimizer, scheduler, clip_grad=clip_grad, groups=groups,
                            layout=layout, loss_scaling=fp16)
