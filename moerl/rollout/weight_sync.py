"""Push trainer weights to rollout servers: SGLang's distributed update protocol, and the disk path.

The same code drives moerl's built-in server (gloo, CPU) and SGLang servers at scale (NCCL, GPU):

1. ``init()``: one process group, *separate from the trainer's torchrun world*, of size
   ``1 + sum(server ranks)`` with the trainer at rank 0 and each server's ranks at its
   ``rank_offset``. Built exactly like SGLang's ``init_custom_process_group``
   (``sglang/srt/utils/common.py``): a TCP store, wrapped in ``PrefixStore(group_name)``, handed to
   ``torch.distributed.distributed_c10d._new_process_group_helper`` as a stand-alone world, so the
   store keys of both sides match. The trainer hosts the store; ``/init_weights_update_group``
   is posted to every server concurrently with the trainer joining (each side blocks until all
   ranks arrive).
2. ``push()``: ``/pause_generation`` (``retract``) -> ``/begin_weight_update`` -> for each bucket
   (at most ``bucket_bytes``, one dtype per bucket so SGLang's ``FlattenedTensorBucket`` offsets
   stay aligned) ``/update_weights_from_distributed`` with names, dtypes, shapes (and
   ``load_format="flattened_bucket"``: one uint8 broadcast per bucket), while rank 0 broadcasts
   the tensors -> ``/end_weight_update`` -> ``/continue_generation``. Only the last bucket carries
   ``weight_version``, so the version changes once all weights are in.

Only trainer rank 0 calls this; the other trainer ranks are not members of the group. If a server
rejects a bucket, the broadcast it never joined is abandoned and the group is marked broken
(:class:`WeightSyncError`); ``close()`` and a new ``init()`` start over.

The disk path (:func:`update_weights_from_disk`) writes a Hugging Face safetensors directory and
posts ``/update_weights_from_disk``; it needs a filesystem both sides see.
"""

from __future__ import annotations

import concurrent.futures
import datetime
import math
import time
from pathlib import Path
from typing import Any, Iterable, Iterator, Sequence

import torch
import torch.distributed as dist

from moerl.hf_io import write_hf_checkpoint
from moerl.rollout.client import RolloutClient, RolloutError, run_sync

ALLOWED_DTYPES = ("float32", "float16", "bfloat16")
FLATTENED_BUCKET = "flattened_bucket"


class WeightSyncError(RuntimeError):
    """A weight push failed; the servers may hold a mix of old and new weights."""


# ------------------------------------------------------------------------------ process group


def init_custom_process_group(*, backend: str, master_address: str, master_port: int, rank: int,
                              world_size: int, group_name: str, timeout_s: float = 600.0,
                              store: dist.Store | None = None) -> dist.ProcessGroup:
    """A process group independent of the default one, as SGLang's ``init_custom_process_group``.

    Rank 0 may pass its own ``store`` (the trainer creates the TCP store first so it knows the
    port); other ranks rendezvous on ``tcp://master_address:master_port``.
    """
    from torch.distributed.distributed_c10d import (
        Backend, PrefixStore, _new_process_group_helper, _world, rendezvous)

    timeout = datetime.timedelta(seconds=timeout_s)
    if store is None:
        store, rank, world_size = next(rendezvous(f"tcp://{master_address}:{master_port}", rank,
                                                  world_size, timeout=timeout))
        store.set_timeout(timeout)
    store = PrefixStore(group_name, store)
    # With an eagerly initialised NCCL default group (bound device), the helper would try to
    # split this group's communicator from the trainer's world communicator, which the servers
    # are not part of. Hide the binding while the stand-alone group is built.
    default = _world.default_pg if dist.is_initialized() else None
    bound = getattr(default, "bound_device_id", None)
    if bound is not None:
        default.bound_device_id = None
    try:
        group, _ = _new_process_group_helper(world_size, rank, [], Backend(backend), store,
                                             group_name=group_name, timeout=timeout)
    finally:
        if bound is not None:
            default.bound_device_id = bound
    _world.pg_group_ranks[group] = {i: i for i in range(world_size)}
    return group


# ------------------------------------------------------------------------------ tensor transport


def validate_tensor_metadata(names: Sequence[str], dtypes: Sequence[str],
                             shapes: Sequence[Sequence[int]], *, load_format: str | None) -> None:
    """The checks both sides apply before a broadcast (SGLang's ``FlattenedTensorBucket.empty``)."""
    if not (len(names) == len(dtypes) == len(shapes)) or not names:
        raise ValueError(f"names, dtypes and shapes must be non-empty and of equal length, got "
                         f"{len(names)}, {len(dtypes)}, {len(shapes)}")
    if load_format not in (None, FLATTENED_BUCKET):
        raise ValueError(f"load_format must be null or {FLATTENED_BUCKET!r}, got {load_format!r}")
    if len(set(names)) != len(names):
        raise ValueError("duplicate tensor names in one update")
    offset = 0
    for name, dtype, shape in zip(names, dtypes, shapes):
        if dtype not in ALLOWED_DTYPES:
            raise ValueError(f"tensor {name!r}: dtype {dtype!r} not in {ALLOWED_DTYPES}")
        if any(d < 0 for d in shape):
            raise ValueError(f"Negative dimension in received tensor {name}: {list(shape)}")
        itemsize = getattr(torch, dtype).itemsize
        if load_format == FLATTENED_BUCKET and offset % itemsize:
            raise ValueError(f"Unaligned received tensor {name}: byte offset {offset}, "
                             f"dtype {dtype}")
        offset += math.prod(shape) * itemsize


def receive_tensors(group: dist.ProcessGroup, names: Sequence[str], dtypes: Sequence[str],
                    shapes: Sequence[Sequence[int]], *, load_format: str | None,
                    device: str = "cpu") -> list[tuple[str, torch.Tensor]]:
    """Server side: receive one update's tensors broadcast from rank 0 (SGLang's receive)."""
    if load_format == FLATTENED_BUCKET:
        sizes = [math.prod(s) * getattr(torch, d).itemsize for d, s in zip(dtypes, shapes)]
        flat = torch.empty(sum(sizes), dtype=torch.uint8, device=device)
        dist.broadcast(flat, src=0, group=group)
        out, offset = [], 0
        for name, dtype, shape, size in zip(names, dtypes, shapes, sizes):
            chunk = flat[offset:offset + size].view(getattr(torch, dtype))
            out.append((name, chunk.reshape(shape)))
            offset += size
        return out
    out = [(n, torch.empty(s, dtype=getattr(torch, d), device=device))
           for n, d, s in zip(names, dtypes, shapes)]
    works = [dist.broadcast(t, src=0, group=group, async_op=True) for _, t in out]
    for w in works:
        w.wait()
    return out


def _dtype_name(t: torch.Tensor) -> str:
    return str(t.dtype).removeprefix("torch.")


def _broadcast_bucket(group: dist.ProcessGroup, tensors: list[torch.Tensor], *, flattened: bool,
                      device: str) -> list:
    """Trainer side: start the broadcasts of one bucket from rank 0 (async work handles)."""
    tensors = [t.detach().to(device).contiguous() for t in tensors]
    if flattened:
        flat = torch.cat([t.reshape(-1).view(torch.uint8) for t in tensors])
        return [dist.broadcast(flat, src=0, group=group, async_op=True)]
    return [dist.broadcast(t, src=0, group=group, async_op=True) for t in tensors]


def iter_buckets(named_tensors: Iterable[tuple[str, torch.Tensor]], *, bucket_bytes: int,
                 one_dtype_per_bucket: bool) -> Iterator[list[tuple[str, torch.Tensor]]]:
    """Group tensors into buckets of at most ``bucket_bytes`` (a larger tensor goes alone)."""
    pending: dict[Any, list] = {}
    sizes: dict[Any, int] = {}
    for name, t in named_tensors:
        if _dtype_name(t) not in ALLOWED_DTYPES:
            raise ValueError(f"tensor {name!r} has dtype {t.dtype}; weight sync sends "
                             f"{ALLOWED_DTYPES}")
        key = t.dtype if one_dtype_per_bucket else None
        nbytes = t.numel() * t.element_size()
        if pending.get(key) and sizes[key] + nbytes > bucket_bytes:
            yield pending.pop(key)
            sizes[key] = 0
        pending.setdefault(key, []).append((name, t))
        sizes[key] = sizes.get(key, 0) + nbytes
    yield from (bucket for bucket in pending.values() if bucket)


# ------------------------------------------------------------------------------ the trainer side


class DistributedWeightSync:
    """Trainer rank 0's handle on the weight-update group of one or more rollout servers.

    ``ranks_per_server``: how many group ranks each server contributes (its TP size for SGLang,
    1 for moerl's built-in server). ``backend`` defaults to NCCL when CUDA is available (tensors
    then travel on ``device="cuda"``), else gloo on CPU.
    """

    def __init__(self, clients: Sequence[RolloutClient], *, master_address: str = "127.0.0.1",
                 master_port: int = 0, backend: str | None = None,
                 group_name: str = "weight_update_group", ranks_per_server: int | Sequence[int] = 1,
                 timeout_s: float = 600.0):
        self.clients = list(clients)
        self.master_address = master_address
        self.master_port = master_port
        self.backend = backend or ("nccl" if torch.cuda.is_available() else "gloo")
        self.device = "cuda" if self.backend == "nccl" else "cpu"
        self.group_name = group_name
        ranks = [ranks_per_server] * len(self.clients) if isinstance(ranks_per_server, int) \
            else list(ranks_per_server)
        if len(ranks) != len(self.clients) or min(ranks, default=1) < 1:
            raise ValueError("ranks_per_server must give a positive rank count per server")
        self.rank_offsets = [1 + sum(ranks[:i]) for i in range(len(ranks))]
        self.world_size = 1 + sum(ranks)
        self.timeout_s = timeout_s
        self.group: dist.ProcessGroup | None = None
        self._store: dist.TCPStore | None = None
        self._pool = concurrent.futures.ThreadPoolExecutor(max(4, 2 * len(self.clients)),
                                                           thread_name_prefix="wsync-http")
        self.broken = False

    def _on_all(self, method: str, **kwargs) -> list:
        """Call one client coroutine method on every server concurrently (threads)."""
        futures = [self._pool.submit(run_sync, getattr(c, method)(**kwargs))
                   for c in self.clients]
        return [f.result() for f in futures]

    def init(self) -> None:
        """Create the group: servers join over HTTP while rank 0 builds its side."""
        self._store = dist.TCPStore(self.master_address, self.master_port, is_master=True,
                                    timeout=datetime.timedelta(seconds=self.timeout_s),
                                    wait_for_workers=False)
        port = self._store.port
        futures = [self._pool.submit(run_sync, c.init_weights_update_group(
            master_address=self.master_address, master_port=port, rank_offset=offset,
            world_size=self.world_size, group_name=self.group_name, backend=self.backend))
            for c, offset in zip(self.clients, self.rank_offsets)]
        self.group = init_custom_process_group(
            backend=self.backend, master_address=self.master_address, master_port=port, rank=0,
            world_size=self.world_size, group_name=self.group_name, timeout_s=self.timeout_s,
            store=self._store)
        for f in futures:
            f.result()
        self.broken = False

    def _send_bucket(self, bucket: list[tuple[str, torch.Tensor]], *, flattened: bool,
                     weight_version: str | None) -> None:
        names = [n for n, _ in bucket]
        dtypes = [_dtype_name(t) for _, t in bucket]
        shapes = [list(t.shape) for _, t in bucket]
        load_format = FLATTENED_BUCKET if flattened else None
        validate_tensor_metadata(names, dtypes, shapes, load_format=load_format)
        http = [self._pool.submit(run_sync, c.update_weights_from_distributed(
            names=names, dtypes=dtypes, shapes=shapes, group_name=self.group_name,
            weight_version=weight_version, load_format=load_format)) for c in self.clients]
        works = _broadcast_bucket(self.group, [t for _, t in bucket], flattened=flattened,
                                  device=self.device)
        deadline = time.monotonic() + self.timeout_s
        while not all(w.is_completed() for w in works):
            failed = [f for f in http if f.done() and f.exception() is not None]
            if failed or time.monotonic() > deadline:
                self.broken = True
                cause = failed[0].exception() if failed else TimeoutError("broadcast timed out")
                raise WeightSyncError(f"a server did not take bucket {names[:3]}...: {cause}; "
                                      f"the weight-update group is out of step, close() and "
                                      f"init() again") from cause
            time.sleep(0.002)
        for w in works:
            w.wait()
        for f in http:
            f.result()

    def push(self, named_tensors: Iterable[tuple[str, torch.Tensor]], *, weight_version: str,
             bucket_bytes: int = 512 << 20, flattened: bool = True,
             pause_mode: str = "retract") -> dict:
        """Send all tensors (Hugging Face checkpoint names) and set ``weight_version``."""
        if self.group is None or self.broken:
            raise WeightSyncError("call init() first (or again, after a failed push)")
        start = time.monotonic()
        self._on_all("pause_generation", mode=pause_mode)
        self._on_all("begin_weight_update")
        num_tensors = num_bytes = num_buckets = 0
        try:
            previous = None
            for bucket in iter_buckets(named_tensors, bucket_bytes=bucket_bytes,
                                       one_dtype_per_bucket=flattened):
                if previous is not None:
                    self._send_bucket(previous, flattened=flattened, weight_version=None)
                previous = bucket
                num_buckets += 1
                num_tensors += len(bucket)
                num_bytes += sum(t.numel() * t.element_size() for _, t in bucket)
            if previous is None:
                raise ValueError("no tensors to push")
            self._send_bucket(previous, flattened=flattened, weight_version=weight_version)
        finally:
            # Close the servers' sessions even after a failed bucket, so a new group can push.
            try:
                self._on_all("end_weight_update")
            finally:
                self._on_all("continue_generation")
        return {"num_tensors": num_tensors, "num_bytes": num_bytes, "num_buckets": num_buckets,
                "seconds": time.monotonic() - start}

    def close(self) -> None:
        """Destroy the group on the servers (best effort) and locally."""
        if self.group is not None:
            for c in self.clients:
                try:
                    run_sync(c.destroy_weights_update_group(group_name=self.group_name))
                except RolloutError:
                    pass
            dist.destroy_process_group(self.group)
        self.group, self._store = None, None
        self._pool.shutdown(wait=False)


# ------------------------------------------------------------------------------ the disk path


def update_weights_from_disk(clients: Sequence[RolloutClient],
                             named_tensors: Iterable[tuple[str, torch.Tensor]], *,
                             out_dir: str | Path, weight_version: str,
                             config_dir: str | Path | None = None,
                             pause_mode: str = "retract") -> Path:
    """Save the tensors under ``out_dir`` and have every server load them in place."""
    path = write_hf_checkpoint(named_tensors, out_dir, config_dir=config_dir)
    for c in clients:
        run_sync(c.pause_generation(mode=pause_mode))
        try:
            run_sync(c.update_weights_from_disk(str(path.resolve()),
                                                weight_version=weight_version))
        finally:
            run_sync(c.continue_generation())
    return path
