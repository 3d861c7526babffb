"""The rollout batch from trainer rank 0 to every rank: broadcast, or sharded by data-parallel rank.

Rank 0 packs the whole batch. What each rank needs of it:
- the per-sample fields and the ``[B, T]`` per-token fields of *every* row: group baselines,
  batch whitening and the mismatch telemetry see the whole batch, and they are small (a few bytes
  per token);
- the heavy per-token data, expert routes ``[B, T, L, K]`` (L*K ids per token) and the sampling
  mask's kept ids (tens of ids per token), only of the rows it trains on: the rows its
  data-parallel rank owns (``moerl.data_parallel``), the same rows for every TP/EP rank of that
  data-parallel rank.

``broadcast`` sends everything to every rank (one collective per tensor over the world group).
``sharded`` broadcasts the light fields and sends each rank its data-parallel rank's rows of the
heavy ones point to point from rank 0; the receiving batch records which rows it holds
(``RolloutBatch.heavy_rows_b``). Both produce the same training results bit for bit. Every tensor
here is a host tensor: the world group must carry CPU tensors (``init_parallel``'s backend).
"""

from __future__ import annotations

import json

import torch
import torch.distributed as dist

from moerl.batch import RolloutBatch, _select_csr, broadcast_batch
from moerl.data_parallel import DataParallel

TRANSPORTS = ("sharded", "broadcast")
HEAVY_FIELDS = ("routes_BTLK", "kept_ids_M", "kept_offsets_N1")


def send_batch(batch: RolloutBatch | None, *, transport: str, dp: DataParallel,
               world_group: dist.ProcessGroup | None = None, src: int = 0) -> RolloutBatch:
    """Rank ``src``'s ``batch`` (None elsewhere) on every rank, by ``transport``."""
    if transport not in TRANSPORTS:
        raise ValueError(f"transport must be one of {TRANSPORTS}, got {transport!r}")
    if transport == "broadcast" or dp.size == 1:
        return broadcast_batch(batch, src=src, group=world_group)
    mine = dist.get_rank() == src
    light = broadcast_batch(_without_heavy(batch) if mine else None, src=src, group=world_group)
    dp_rank_of = _dp_ranks(dp, world_group)
    rows = dp.owned_rows(light.batch_size)
    if mine:
        for dst, dst_dp_rank in enumerate(dp_rank_of):
            if dst != src:
                _send_tensors(_heavy_rows(batch, dp.owned_rows(batch.batch_size, dst_dp_rank)),
                              dst, world_group)
        heavy = _heavy_rows(batch, rows)
    else:
        heavy = _recv_tensors(src, world_group)
    for name, value in heavy.items():
        setattr(light, name, value)
    light.heavy_rows_b = rows
    return light


def _without_heavy(batch: RolloutBatch) -> RolloutBatch:
    return RolloutBatch(**{f: None if f in HEAVY_FIELDS else v for f, v in vars(batch).items()})


def _heavy_rows(batch: RolloutBatch, rows_b: torch.Tensor) -> dict[str, torch.Tensor]:
    """The heavy fields of ``rows_b`` (full width), as the receiving rank stores them."""
    out = {}
    if batch.routes_BTLK is not None:
        out["routes_BTLK"] = batch.routes_BTLK[rows_b].contiguous()
    if batch.kept_offsets_N1 is not None:
        out["kept_ids_M"], out["kept_offsets_N1"] = _select_csr(
            batch.kept_ids_M, batch.kept_offsets_N1, rows_b, batch.seq_len, batch.seq_len)
    return out


def _dp_ranks(dp: DataParallel, world_group) -> list[int]:
    """The data-parallel rank of every world rank."""
    world = dist.get_world_size(world_group)
    mine = torch.tensor([dp.rank], dtype=torch.long)
    every = [torch.empty_like(mine) for _ in range(world)]
    dist.all_gather(every, mine, group=world_group)
    return [int(t) for t in every]


def _send_tensors(tensors: dict[str, torch.Tensor], dst: int, group) -> None:
    """A JSON header (names, dtypes, shapes) then each tensor, point to point (no pickle)."""
    header = json.dumps({k: [str(v.dtype).removeprefix("torch."), list(v.shape)]
                         for k, v in tensors.items()}).encode()
    dist.send(torch.tensor([len(header)], dtype=torch.long), dst, group=group)
    dist.send(torch.frombuffer(bytearray(header), dtype=torch.uint8), dst, group=group)
    for value in tensors.values():
        dist.send(value.contiguous(), dst, group=group)


def _recv_tensors(src: int, group) -> dict[str, torch.Tensor]:
    size = torch.empty(1, dtype=torch.long)
    dist.recv(size, src, group=group)
    raw = torch.empty(int(size), dtype=torch.uint8)
    dist.recv(raw, src, group=group)
    out = {}
    for name, (dtype, shape) in json.loads(bytes(raw.tolist()).decode()).items():
        out[name] = torch.empty(shape, dtype=getattr(torch, dtype))
        dist.recv(out[name], src, group=group)
    return out
