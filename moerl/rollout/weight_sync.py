"""Push trainer weights to rollout servers: SGLang's distributed update protocol, and the disk path.

The same code drives moerl's built-in server (gloo, CPU) and SGLang servers at scale (NCCL, GPU):

1. ``init()``: one process group *per server*, separate from the trainer's torchrun world, of
   size ``1 + the server's ranks``, with the trainer at rank 0 and the server's ranks from
   ``rank_offset=1``. Built exactly like SGLang's ``init_custom_process_group``
   (``sglang/srt/utils/common.py``): a TCP store, wrapped in ``PrefixStore(group_name)``, handed to
   ``torch.distributed.distributed_c10d._new_process_group_helper`` as a stand-alone world, so the
   store keys of both sides match. The trainer hosts one store for all the groups (each group's
   own name keeps their keys apart); ``/init_weights_update_group`` is posted to a server
   concurrently with the trainer joining its group (each side blocks until both arrive).
2. ``push()``: ``/pause_generation`` (``retract``) -> ``/begin_weight_update`` -> for each bucket
   (at most ``bucket_bytes``, one dtype per bucket so SGLang's ``FlattenedTensorBucket`` offsets
   stay aligned) ``/update_weights_from_distributed`` with names, dtypes, shapes (and
   ``load_format="flattened_bucket"``: one uint8 broadcast per bucket), while rank 0 broadcasts
   the tensors on every server's group -> ``/end_weight_update`` -> ``/continue_generation``.
   Only the last bucket carries ``weight_version``, so the version changes once all weights are
   in.

Why a group per server and not one group of all servers at their rank offsets (SGLang's API
allows both: it keeps its groups in a dict by ``group_name``): a collective involves every
member, so in one shared group a server that dies mid-broadcast stalls or starves the others
(gloo's broadcast is a binomial tree, so from 3 servers on some receive through another server;
NCCL does not notice a dead peer and hangs until its watchdog, which then takes the survivor
down), and the survivors would need a rebuilt group and the whole update again. With a group
each, the survivors are in no collective with the dead server: they take every bucket, the push
succeeds, and the dead server's group is simply abandoned. The price is rank 0's egress: each
bucket leaves rank 0 once per server rather than once per tree level (gloo) or once (NCCL's
pipelined broadcast), so a push of ``W`` bytes to ``N`` servers sends ``N * W`` from rank 0.

Only trainer rank 0 calls this; the other trainer ranks are not members of the groups. If a
server refuses a bucket (HTTP 4xx), the push fails and the handle is marked broken
(:class:`WeightSyncError`); ``close()`` and a new ``init()`` start over. A server that *fails*
(connection lost, 5xx, timeout, failed broadcast) is dropped from the push instead (see
:class:`DistributedWeightSync`).

The disk path (:func:`update_weights_from_disk`) writes a Hugging Face safetensors directory and
posts ``/update_weights_from_disk``; it needs a filesystem both sides see.
"""

from __future__ import annotations

import concurrent.futures
import datetime
import logging
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Iterator, Sequence

import torch
import torch.distributed as dist

from moerl.hf_io import write_hf_checkpoint
from moerl.rollout.client import RETRYABLE_STATUS, RolloutClient, RolloutError, run_sync
from moerl.rollout.fleet import NoServerLeft

log = logging.getLogger("moerl.rollout")

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


def _bucket_tensors(tensors: list[torch.Tensor], *, flattened: bool,
                    device: str) -> list[torch.Tensor]:
    """Trainer side: what rank 0 broadcasts for one bucket (one uint8 tensor when flattened)."""
    tensors = [t.detach().to(device).contiguous() for t in tensors]
    if flattened:
        return [torch.cat([t.reshape(-1).view(torch.uint8) for t in tensors])]
    return tensors


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


@dataclass
class _Link:
    """One server's own weight-update group: trainer rank 0 plus the server's ranks."""

    client: RolloutClient
    num_ranks: int | None  # the server's ranks in the group; None: ask it at every join
    name: str = ""  # the group's name on both sides, fresh for every join
    group: dist.ProcessGroup | None = None
    works: list = field(default_factory=list)  # the last bucket's broadcasts on this group


def group_ranks(server_info: dict, url: str = "the server") -> int:
    """How many ranks a server brings to a weight-update group, from its ``/server_info``.

    SGLang joins every tensor-parallel rank of its model at rank ``rank_offset + tp_rank``
    (``weight_updater.init_weights_update_group``), so a TP=4 server is 4 ranks; moerl's
    built-in server reports ``tp_size`` 1. Several data-parallel replicas behind one server
    (``dp_size`` > 1 without DP attention) or pipeline stages would repeat those ranks: refused,
    with what to do instead."""
    def size(key: str) -> int:
        return int(server_info.get(key) or 1)

    tp, dp, pp = size("tp_size"), size("dp_size"), size("pp_size")
    if pp > 1 or (dp > 1 and not server_info.get("enable_dp_attention")):
        raise WeightSyncError(
            f"{url} runs dp_size={dp}, pp_size={pp}: a distributed weight push addresses one "
            f"server's tensor-parallel ranks (group rank = offset + tp_rank), which several "
            f"data-parallel replicas or pipeline stages would repeat; run one server per "
            f"replica with pp_size=1 (list them in rollout.urls), or set weight_sync.method=disk")
    return tp


class DistributedWeightSync:
    """Trainer rank 0's handle on the weight-update groups of one or more rollout servers.

    Each server has a group of its own (trainer rank 0 plus the server's ranks from rank offset
    1), named ``{group_name}-{server}-{serial}``; every bucket is broadcast once per group. A
    server that fails during a push (connection lost, 5xx, timeout, or a failed broadcast: what
    a dead server causes) is dropped from that push with a warning and its group abandoned; the
    others are in no collective with it, so they take the full update and the push succeeds
    (``stats["dropped"]`` names the dropped servers). It rejoins with a fresh group at a later
    push; :meth:`forget` abandons the group of a server known to be gone (restarted, or down).
    With every server dropped the push raises :class:`NoServerLeft`. A server that *refuses* a
    bucket (HTTP 4xx: the request's fault, every server would) fails the push with
    :class:`WeightSyncError` and marks the handle broken.

    ``ranks_per_server``: how many group ranks each server contributes (its TP size for SGLang,
    1 for moerl's built-in server); None (the default) asks each server's ``/server_info`` at
    every join (:func:`group_ranks`), so a restarted server with another TP size still fits.
    ``backend`` defaults to NCCL when CUDA is available (tensors then travel on
    ``device="cuda"``), else gloo on CPU.
    """

    def __init__(self, clients: Sequence[RolloutClient], *, master_address: str = "127.0.0.1",
                 master_port: int = 0, backend: str | None = None,
                 group_name: str = "weight_update_group",
                 ranks_per_server: int | Sequence[int] | None = None, timeout_s: float = 600.0):
        ranks = list(ranks_per_server) if isinstance(ranks_per_server, Sequence) \
            else [ranks_per_server] * len(clients)
        self._ask_ranks = ranks_per_server is None
        if len(ranks) != len(clients) or (not self._ask_ranks and min(ranks, default=1) < 1):
            raise ValueError("ranks_per_server must give a positive rank count per server")
        self.links = [_Link(client, num_ranks) for client, num_ranks in zip(clients, ranks)]
        self.master_address = master_address
        self.master_port = master_port
        self.backend = backend or ("nccl" if torch.cuda.is_available() else "gloo")
        self.device = "cuda" if self.backend == "nccl" else "cpu"
        self.group_name = group_name
        self.timeout_s = timeout_s
        self._store: dist.TCPStore | None = None
        self._serial = 0
        self._abandoned: list[_Link] = []  # groups with broadcasts still pending
        self._pool = concurrent.futures.ThreadPoolExecutor(max(4, 2 * len(self.links)),
                                                           thread_name_prefix="wsync-http")
        self.broken = False

    @property
    def clients(self) -> list[RolloutClient]:
        return [link.client for link in self.links]

    def init(self, indices: Iterable[int] | None = None) -> None:
        """Join every server in ``indices`` (default: all) that has no group yet."""
        if self._store is None:
            self._store = dist.TCPStore(self.master_address, self.master_port, is_master=True,
                                        timeout=datetime.timedelta(seconds=self.timeout_s),
                                        wait_for_workers=False)
        for i in range(len(self.links)) if indices is None else indices:
            if self.links[i].group is None:
                self._join(self.links[i], i)
        self.broken = False

    def _join(self, link: _Link, index: int) -> None:
        """The server joins over HTTP while rank 0 builds its side (each blocks for the other)."""
        self._serial += 1
        link.name = f"{self.group_name}-{index}-{self._serial}"
        if self._ask_ranks:
            link.num_ranks = group_ranks(run_sync(link.client.server_info()),
                                         link.client.base_url)
        world_size = 1 + link.num_ranks
        http = self._pool.submit(run_sync, link.client.init_weights_update_group(
            master_address=self.master_address, master_port=self._store.port, rank_offset=1,
            world_size=world_size, group_name=link.name, backend=self.backend))
        link.group = init_custom_process_group(
            backend=self.backend, master_address=self.master_address,
            master_port=self._store.port, rank=0, world_size=world_size, group_name=link.name,
            timeout_s=self.timeout_s, store=self._store)
        http.result()

    def forget(self, index: int) -> None:
        """Abandon server ``index``'s group (the server died, refused a bucket, or went down and
        may come back as a new process); the next push to it joins a fresh one.

        The group is destroyed at once, but while a broadcast on it is pending (a server that
        refused a bucket, or vanished without closing its connections) the last reference to it
        is kept until :meth:`close`: gloo's destructor waits for pending work, up to the group's
        timeout."""
        link = self.links[index]
        if link.group is None:
            return
        dist.destroy_process_group(link.group)
        if not all(w.is_completed() for w in link.works):
            self._abandoned.append(_Link(link.client, link.num_ranks, link.name, link.group,
                                         link.works))
        link.group, link.works = None, []

    def _drop(self, index: int, why: str, dropped: dict[int, str]) -> None:
        log.warning("rollout server %s failed during the weight push (%s): dropped from it; "
                    "the other servers take the update", self.links[index].client.base_url, why)
        dropped[index] = why
        self.forget(index)

    def _on_members(self, members: list[int], method: str, dropped: dict[int, str],
                    **kwargs) -> list[int]:
        """Call one client method on every member concurrently; a server-side failure drops
        the member, a refusal (HTTP 4xx) raises. Returns the members left."""
        futures = {i: self._pool.submit(run_sync, getattr(self.links[i].client, method)(**kwargs))
                   for i in members}
        for i, future in futures.items():
            try:
                future.result()
            except RolloutError as err:
                if _refused(err):
                    raise
                self._drop(i, f"{method}: {_first_line(err)}", dropped)
        return [i for i in members if i not in dropped]

    def _send_bucket(self, bucket: list[tuple[str, torch.Tensor]], members: list[int],
                     dropped: dict[int, str], *, flattened: bool,
                     weight_version: str | None) -> list[int]:
        """Broadcast one bucket on every member's group; returns the members that took it."""
        names = [n for n, _ in bucket]
        dtypes = [_dtype_name(t) for _, t in bucket]
        shapes = [list(t.shape) for _, t in bucket]
        load_format = FLATTENED_BUCKET if flattened else None
        validate_tensor_metadata(names, dtypes, shapes, load_format=load_format)
        tensors = _bucket_tensors([t for _, t in bucket], flattened=flattened, device=self.device)
        http = {}
        for i in members:
            link = self.links[i]
            http[i] = self._pool.submit(run_sync, link.client.update_weights_from_distributed(
                names=names, dtypes=dtypes, shapes=shapes, group_name=link.name,
                weight_version=weight_version, load_format=load_format))
            link.works = [dist.broadcast(t, src=0, group=link.group, async_op=True)
                          for t in tensors]
        pending = set(members)
        deadline = time.monotonic() + self.timeout_s
        while pending:
            for i in sorted(pending):
                why = self._bucket_state(i, http[i], names)
                if why is not None:
                    pending.discard(i)
                    if why:
                        self._drop(i, why, dropped)
            if pending and time.monotonic() > deadline:
                for i in sorted(pending):
                    self._drop(i, f"bucket {names[:3]}... not taken in {self.timeout_s:g} s",
                               dropped)
                break
            time.sleep(0.002)
        return [i for i in members if i not in dropped]

    def _bucket_state(self, index: int, http: concurrent.futures.Future,
                      names: list[str]) -> str | None:
        """None while server ``index`` is still taking the bucket; "" once it took it; else why
        it failed. A refusal (HTTP 4xx) raises :class:`WeightSyncError`."""
        link = self.links[index]
        if http.done() and http.exception() is not None:
            err = http.exception()
            if _refused(err):
                self.broken = True
                self.forget(index)  # its broadcast waits for a receive that never comes
                raise WeightSyncError(f"the server {link.client.base_url} did not take bucket "
                                      f"{names[:3]}...: {err}; its weight-update group is out "
                                      f"of step, close() and init() again") from err
            return _first_line(err)
        if not all(w.is_completed() for w in link.works):
            return None
        try:
            for w in link.works:
                w.wait()
        except RuntimeError as err:  # the broadcast failed: the peer is gone
            return f"broadcast failed: {_first_line(err)}"
        return None if not http.done() else ""

    def push(self, named_tensors: Iterable[tuple[str, torch.Tensor]], *, weight_version: str,
             bucket_bytes: int = 512 << 20, flattened: bool = True, pause_mode: str = "retract",
             members: Sequence[int] | None = None) -> dict:
        """Send all tensors (Hugging Face checkpoint names) to the servers ``members`` (default:
        all; joined first if they have no group) and set ``weight_version``."""
        if self.broken:
            raise WeightSyncError("call init() first (or again, after a failed push)")
        members = list(range(len(self.links)) if members is None else members)
        start = time.monotonic()
        dropped: dict[int, str] = {}
        live = self._on_members(members, "pause_generation", dropped, mode=pause_mode)
        # Join after the pause: a server that is gone fails the pause and is dropped, whereas
        # rank 0's side of a join would wait out the group's timeout for it.
        self.init(live)
        live = self._on_members(live, "begin_weight_update", dropped)
        _check_left(self.links, dropped, live)
        num_tensors = num_bytes = num_buckets = 0
        try:
            previous = None
            for bucket in iter_buckets(named_tensors, bucket_bytes=bucket_bytes,
                                       one_dtype_per_bucket=flattened):
                if previous is not None:
                    live = self._send_bucket(previous, live, dropped, flattened=flattened,
                                             weight_version=None)
                    _check_left(self.links, dropped, live)
                previous = bucket
                num_buckets += 1
                num_tensors += len(bucket)
                num_bytes += sum(t.numel() * t.element_size() for _, t in bucket)
            if previous is None:
                raise ValueError("no tensors to push")
            live = self._send_bucket(previous, live, dropped, flattened=flattened,
                                     weight_version=weight_version)
        finally:
            # Close the servers' sessions even after a failed bucket, so a new group can push.
            try:
                live = self._on_members(live, "end_weight_update", dropped)
            finally:
                live = self._on_members(live, "continue_generation", dropped)
        _check_left(self.links, dropped, live)
        return {"num_tensors": num_tensors, "num_bytes": num_bytes, "num_buckets": num_buckets,
                "seconds": time.monotonic() - start, "dropped": dropped}

    def close(self) -> None:
        """Destroy the groups on the servers (best effort) and locally. A server destroying
        its side also ends rank 0's broadcasts still pending on an abandoned group."""
        for i, link in enumerate(self.links):
            if link.group is not None:
                _destroy_on_server(link)
                self.forget(i)
        for link in self._abandoned:
            _destroy_on_server(link)
        self._abandoned = []
        self._store = None
        self._pool.shutdown(wait=False)


def _destroy_on_server(link: _Link) -> None:
    try:
        run_sync(link.client.destroy_weights_update_group(group_name=link.name))
    except RolloutError:
        pass  # best effort: the server may be gone


def _refused(err: BaseException) -> bool:
    """The server answered and refused the request (HTTP 4xx): not a server failure. A status
    the client retries (429: overloaded) that outlasted its retries is a failing server, dropped
    from the push like one that answers 5xx."""
    status = getattr(err, "status", None)
    return status is not None and status < 500 and status not in RETRYABLE_STATUS


def _first_line(err: BaseException) -> str:
    return (str(err).splitlines() or [type(err).__name__])[0][:300]


def _check_left(links: list[_Link], dropped: dict[int, str], live: list[int]) -> None:
    if not live:
        reasons = "; ".join(f"{links[i].client.base_url}: {why}" for i, why in dropped.items())
        raise NoServerLeft(f"no rollout server is left: every one failed the weight push "
                           f"({reasons})", dropped=dict(dropped))


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
