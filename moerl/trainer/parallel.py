"""Process groups and the parallel layout, as explicit values (STYLE rule 6).

Megatron keeps its groups in module globals (``parallel_state``); moerl initialises them once here
and hands the code that communicates a :class:`ParallelLayout` (sizes and ranks) and the
``ProcessGroup`` handles it needs, so no function reaches for a global group behind the caller's
back.

Layout: ``world = tp * dp`` for the dense part; the experts use ``ep * etp`` of those ranks with
``expert_dp = world / (ep * etp)``. MoE with ``tp > 1`` requires sequence parallelism in
megatron-core, so ``sp`` is on exactly when ``tp > 1``. Pipeline and context parallelism are not
used (size 1).

Backends. The loop moves host tensors through collectives (the rollout batch and its JSON header,
per-row results gathered over data-parallel ranks, metric scalars, checkpoint barriers) as well as
device tensors (vocab-parallel log-probs, sequence-parallel routes, weight gathers, the optimizer's
found-inf flag). NCCL carries only CUDA tensors, so with CUDA the default group is
``cpu:gloo,cuda:nccl`` (as torchtitan does): torch picks the backend by the tensor's device, and
every group Megatron derives from the default one (``new_group`` without a backend) gets both.
Audit of every collective in ``moerl/`` and the device of its tensors:

    module                           collective            tensors
    batch.broadcast_json/_batch      broadcast (world)     host
    data_parallel.DataParallel       all_reduce (dp)       host
    checkpoint.CheckpointManager     barrier (world)       (device of the backend's choice)
    trainer.optimizer                all_reduce, barrier   device (found-inf flag)
    trainer.logprobs                 all_reduce (tp)       device (logit statistics)
    trainer.routing_replay           all_gather (tp)       device (router top-k indices)
    trainer.hf_bridge                all_gather (tp/etp),  device (weights), barrier (world)
                                     broadcast (ep)
    trainer.critic (Megatron)        SP gather (tp)        device
    rollout.weight_sync              broadcast (own group  device of that group's backend
                                     with the servers)     (moved there explicitly)
"""


from __future__ import annotations

import datetime
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

from moerl.trainer.megatron_version import import_megatron


@dataclass(frozen=True)
class ParallelLayout:
    """Sizes and this process's ranks."""

    world: int
    rank: int
    tp: int
    ep: int
    etp: int
    dp: int
    expert_dp: int
    tp_rank: int
    ep_rank: int
    dp_rank: int

    @property
    def sp(self) -> bool:
        return self.tp > 1


@dataclass(frozen=True)
class ProcessGroups:
    """The groups the trainer communicates over (torch ``ProcessGroup`` handles)."""

    tp: dist.ProcessGroup  # vocab-parallel log-probs, sequence-parallel route sharding
    dp: dist.ProcessGroup  # batch statistics (token counts for global loss denominators)
    ep: dist.ProcessGroup
    model_parallel: dist.ProcessGroup  # grad-norm of dense parameters
    world: dist.ProcessGroup


def validate_layout(*, world: int, tp: int, ep: int, etp: int) -> None:
    """Raise ValueError naming the problem when the sizes do not tile the world."""
    for name, size in (("tp", tp), ("ep", ep), ("etp", etp)):
        if size < 1:
            raise ValueError(f"parallel.{name} must be >= 1, got {size}")
    if world % tp:
        raise ValueError(f"parallel.tp={tp} does not divide the world size {world} "
                         f"(torchrun --nproc_per_node * nnodes)")
    if world % (ep * etp):
        raise ValueError(f"parallel.ep * parallel.etp = {ep}*{etp} does not divide the world size "
                         f"{world}; choose ep*etp among the divisors of {world}")


# The backend for CUDA tensors; a module attribute so that a test can stand in a CUDA-only backend
# (NCCL itself is absent from CPU builds of torch).
CUDA_BACKEND = "nccl"


def default_backend(*, cuda: bool) -> str:
    """The default process group's backend: gloo for host tensors, plus NCCL for CUDA tensors
    when CUDA is present (NCCL alone cannot carry the host tensors the loop communicates)."""
    return f"cpu:gloo,cuda:{CUDA_BACKEND}" if cuda else "gloo"


def init_parallel(*, tp: int, ep: int, etp: int, seed: int,
                  timeout_s: float = 600.0) -> tuple[ParallelLayout, ProcessGroups]:
    """Initialise torch.distributed (from torchrun's environment) and Megatron's groups.

    Backend: :func:`default_backend` (host tensors on gloo, CUDA tensors on NCCL). Also applies
    the CPU patches when CUDA is absent and seeds Megatron's model-parallel RNG tracker. Raises
    :class:`~moerl.trainer.megatron_version.UnsupportedMegatronError` first when the installed
    megatron-core is not a supported release.
    """
    import_megatron()
    from megatron.core import parallel_state as ps
    from megatron.core.tensor_parallel import model_parallel_cuda_manual_seed

    from moerl.trainer.cpu_compat import apply_cpu_patches

    apply_cpu_patches()
    if not dist.is_initialized():
        if "RANK" not in os.environ:
            # A single process without torchrun: a world of one.
            os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
            os.environ.setdefault("MASTER_PORT", str(_free_port()))
            os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0")
        cuda = torch.cuda.is_available()
        if cuda:
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        dist.init_process_group(default_backend(cuda=cuda),
                                timeout=datetime.timedelta(seconds=timeout_s))
    world = dist.get_world_size()
    validate_layout(world=world, tp=tp, ep=ep, etp=etp)
    if not ps.model_parallel_is_initialized():
        ps.initialize_model_parallel(tensor_model_parallel_size=tp, expert_model_parallel_size=ep,
                                     expert_tensor_parallel_size=etp)
    model_parallel_cuda_manual_seed(seed)
    layout = ParallelLayout(
        world=world, rank=dist.get_rank(), tp=tp, ep=ep, etp=etp, dp=world // tp,
        expert_dp=world // (ep * etp), tp_rank=ps.get_tensor_model_parallel_rank(),
        ep_rank=ps.get_expert_model_parallel_rank(), dp_rank=ps.get_data_parallel_rank())
    groups = ProcessGroups(
        tp=ps.get_tensor_model_parallel_group(), dp=ps.get_data_parallel_group(),
        ep=ps.get_expert_model_parallel_group(), model_parallel=ps.get_model_parallel_group(),
        world=dist.group.WORLD)
    return layout, groups


def destroy_parallel() -> None:
    """Tear down Megatron's groups and the default process group (safe to call twice)."""
    from megatron.core import parallel_state as ps

    if ps.model_parallel_is_initialized():
        ps.destroy_model_parallel()
    if dist.is_initialized():
        dist.destroy_process_group()


def _free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]
