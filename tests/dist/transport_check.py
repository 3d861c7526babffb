"""Sharded vs broadcast batch transport on a world of CPU processes (no model).

Run under torchrun; ``--tp`` ranks per data-parallel rank (Megatron's order: TP ranks adjacent).
Every rank receives the same batch both ways and checks, for its data-parallel rank's rows, that
the sharded batch selects exactly what the broadcast one does; writes ``OUT/rank_<r>.json``.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
import torch.distributed as dist

from moerl.batch import Sample, pack_samples
from moerl.batch_transport import send_batch
from moerl.data_parallel import DataParallel
from moerl.trainer.model import architecture_from_hf
from moerl.tiny_model import TINY_QWEN3_MOE


def samples(num: int, arch) -> list[Sample]:
    gen = torch.Generator().manual_seed(7)
    out = []
    for b in range(num):
        prompt = torch.randint(1, 50, (2 + b % 3,), generator=gen).tolist()
        response = torch.randint(1, 50, (1 + (5 * b) % 7,), generator=gen).tolist()
        positions = len(prompt) + len(response) - 1
        routes = torch.stack([torch.randperm(arch.num_experts, generator=gen)[:arch.top_k]
                              for _ in range(positions * arch.num_layers)])
        lengths = torch.randint(1, 5, (len(response),), generator=gen)
        offsets = torch.cat([torch.zeros(1, dtype=torch.long), lengths.cumsum(0)])
        ids = torch.randint(0, 60, (int(offsets[-1]),), generator=gen, dtype=torch.int32)
        ids[offsets[:-1]] = torch.tensor(response, dtype=torch.int32)
        out.append(Sample(group_index=b // 2, sample_index=b % 2, prompt_ids=prompt,
                          response_ids=response, rollout_logprobs_R=-torch.rand(len(response)),
                          full_logprobs_R=-torch.rand(len(response)), finish_reason="stop",
                          routes_TLK=routes.view(positions, arch.num_layers, arch.top_k),
                          mask_ids_M=ids, mask_offsets_R1=offsets, reward=float(b % 2)))
    return out


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--tp", type=int, required=True)
    parser.add_argument("--rows", type=int, default=11)
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    dp = DataParallel(size=world // args.tp, rank=rank // args.tp, group=None)
    arch = architecture_from_hf({**TINY_QWEN3_MOE, "model_type": "qwen3_moe"})
    full = pack_samples(samples(args.rows, arch), pad_id=0, pad_multiple=args.tp, arch=arch)
    batch = full if rank == 0 else None
    broadcast = send_batch(batch, transport="broadcast", dp=dp)
    sharded = send_batch(batch, transport="sharded", dp=dp)
    rows = dp.owned_rows(args.rows)
    problems = []
    for name, value in broadcast.tensors().items():
        if name not in ("routes_BTLK", "kept_ids_M", "kept_offsets_N1") and not torch.equal(
                value, getattr(sharded, name)):
            problems.append(f"light field {name} differs")
    for i in range(0, len(rows), 2):
        a, b = broadcast.select(rows[i:i + 2]), sharded.select(rows[i:i + 2])
        for name, value in a.tensors().items():
            if not torch.equal(value, getattr(b, name)):
                problems.append(f"rows {rows[i:i + 2].tolist()}: {name} differs")
    (args.out / f"rank_{rank}.json").write_text(json.dumps({"rank": rank, "dp_rank": dp.rank, "rows": sharded.heavy_rows_b.tolist(),
                      "route_rows": sharded.routes_BTLK.shape[0],
                      "route_dtype": str(sharded.routes_BTLK.dtype),
                      "broadcast_route_rows": broadcast.routes_BTLK.shape[0],
                      "problems": problems}))
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
