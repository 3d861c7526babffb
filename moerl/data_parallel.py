"""Data-parallel plumbing of the RL loop: which rows a rank owns, and the host-side collectives
that turn per-rank results into whole-batch values.

Every function takes its group explicitly (STYLE rule 6): a :class:`DataParallel` holds the
data-parallel group and this rank's place in it, built once from the ``ParallelLayout`` and
``ProcessGroups`` that ``moerl.trainer.parallel.init_parallel`` returns. Nothing here reaches for
Megatron's global ``parallel_state``, and nothing here imports Megatron.

Every tensor these collectives move lives on the host (batches, per-row results copied back with
``.cpu()``, metric scalars): the groups they use must carry CPU tensors, which is why the default
process group is ``cpu:gloo,cuda:nccl`` when CUDA is present (``init_parallel``).

Row ownership: data-parallel rank ``r`` owns rows ``r, r + dp, r + 2*dp, ...`` of the rollout
batch (strided, so every rank gets a similar mix of prompts) in every stage, the updates
included: an update's mini-batch ``i`` is, on every rank, chunk ``i`` of a shared-seed shuffle of
the rank's own rows. A rank therefore only ever needs the heavy per-row data (routes, sampling
masks) of its own rows, which is all the sharded batch transport sends it
(``moerl.batch_transport``). With one data-parallel rank this is the plain shuffle of the batch.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class DataParallel:
    """This rank's place in the data-parallel group, and the group (None when ``size == 1``)."""

    size: int
    rank: int
    group: dist.ProcessGroup | None

    @classmethod
    def from_layout(cls, layout, groups) -> "DataParallel":
        """From ``init_parallel``'s ``ParallelLayout`` and ``ProcessGroups``."""
        return cls(size=layout.dp, rank=layout.dp_rank, group=groups.dp if layout.dp > 1 else None)

    def owned_rows(self, num_rows: int, rank: int | None = None) -> torch.Tensor:
        """The rows of a ``num_rows`` batch that data-parallel ``rank`` (default: this one) owns."""
        return torch.arange(self.rank if rank is None else rank, num_rows, self.size)

    def mini_batches(self, num_rows: int, num_mini_batches: int,
                     seed: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """``(this rank's rows, every rank's rows)`` of each mini-batch of one epoch, both sorted.

        Each rank shuffles its own rows with the same seed and chunks them into at most
        ``num_mini_batches`` pieces; mini-batch ``i`` is the union of every rank's chunk ``i``
        (empty where a rank has fewer chunks, so every rank takes the same number of optimizer
        steps), and every rank can compute global loss denominators without communicating.
        """
        per_rank = []
        for rank in range(self.size):
            rows = self.owned_rows(num_rows, rank)
            order = torch.randperm(len(rows), generator=torch.Generator().manual_seed(seed))
            per_rank.append(rows[order].chunk(num_mini_batches))
        empty = torch.empty(0, dtype=torch.long)
        out = []
        for i in range(max(len(chunks) for chunks in per_rank)):
            pieces = [chunks[i] if i < len(chunks) else empty for chunks in per_rank]
            out.append((pieces[self.rank].sort().values, torch.cat(pieces).sort().values))
        return out

    def gather_rows(self, tensor_B: torch.Tensor) -> None:
        """In place: rows owned by other ranks filled with their values (each rank computed its
        own rows; the others are zero or stale). Host tensors only."""
        if self.size == 1:
            return
        assert tensor_B.device.type == "cpu", "data-parallel row gathers move host tensors"
        summed = tensor_B.clone()
        others = torch.ones(tensor_B.shape[0], dtype=torch.bool)
        others[self.owned_rows(tensor_B.shape[0])] = False
        summed[others] = 0
        dist.all_reduce(summed, group=self.group)
        tensor_B.copy_(summed)

    def sum_(self, tensor: torch.Tensor) -> torch.Tensor:
        """In-place sum over the data-parallel ranks (a host tensor); returns it."""
        if self.size > 1:
            dist.all_reduce(tensor, group=self.group)
        return tensor

    def reduce_metrics(self, metrics: dict[str, float]) -> dict[str, float]:
        """Scalar metrics of the whole data-parallel group (same keys on every rank). Keys
        containing ``loss`` are this rank's share of a loss with global denominators
        (``Actor.train_step``'s convention): they are summed, so the logged loss is the true loss
        at any DP size. Every other metric is averaged."""
        if self.size == 1:
            return metrics
        keys = sorted(metrics)
        values = torch.tensor([float(metrics[k]) for k in keys], dtype=torch.float64)
        self.sum_(values)
        return {k: v if "loss" in k else v / self.size for k, v in zip(keys, values.tolist())}
