"""Rollout batch transport: bytes and peak host memory for routes per rank, broadcast vs sharded.

    python tools/bench_transport.py [--world 4] [--tp 2] [--samples 64] [--seq-len 1024]

A synthetic batch shaped like a scaled-down Qwen3-30B-A3B plan (README "At scale": 48 layers,
128 experts, top-8, 20 kept ids per token; 1024 samples of 8.7k tokens there, fewer and shorter
here) goes from rank 0 to a world of ``--world`` CPU processes (gloo) twice, each in a fresh
torchrun launch so that peak memory is per mode:
- ``broadcast``: the transport before sharding, every tensor to every rank, routes int32;
- ``sharded``: moerl's default, routes in ``route_dtype`` (uint8 here) and routes/masks only of
  the receiving rank's data-parallel rows (data-parallel size ``world / tp``).
Per rank: route bytes received, mask bytes received, peak RSS growth during the transfer (MiB; on
rank 0, which builds the batch first, the growth over holding it). Prints one JSON object with
both modes and ``route_bytes_ratio`` (broadcast / sharded, per receiving rank), expected
``dp * 4`` (4 bytes per id down to 1).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
LAYERS, EXPERTS, TOP_K, KEPT = 48, 128, 8, 20


def synthetic_batch(samples: int, seq_len: int, *, route_dtype: torch.dtype):
    from moerl.batch import RolloutBatch

    gen = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, 1000, (samples, seq_len), generator=gen)
    mask = torch.zeros(samples, seq_len, dtype=torch.bool)
    mask[:, seq_len // 8:] = True
    routes = torch.randint(0, EXPERTS, (samples, seq_len, LAYERS, TOP_K), generator=gen,
                           dtype=torch.int32).to(route_dtype)
    lengths = mask.reshape(-1).long() * KEPT
    offsets = torch.zeros(samples * seq_len + 1, dtype=torch.long)
    torch.cumsum(lengths, 0, out=offsets[1:])
    return RolloutBatch(
        tokens_BT=tokens, targets_BT=tokens.roll(-1, 1), response_mask_BT=mask,
        prompt_lengths_B=torch.full((samples,), seq_len // 8),
        response_lengths_B=torch.full((samples,), seq_len - seq_len // 8),
        rollout_logprobs_BT=-torch.rand(samples, seq_len, generator=gen),
        truncated_B=torch.zeros(samples, dtype=torch.bool), routes_BTLK=routes,
        kept_ids_M=torch.randint(0, 150_000, (int(offsets[-1]),), generator=gen),
        kept_offsets_N1=offsets)


def _rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def worker(args) -> None:
    import torch.distributed as dist

    from moerl.batch_transport import send_batch
    from moerl.data_parallel import DataParallel
    from moerl.routes import route_dtype

    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    dp_size = world // args.tp
    # Megatron's order: TP ranks are adjacent, so world rank r is data-parallel rank r // tp.
    dp = DataParallel(size=dp_size, rank=rank // args.tp, group=None)
    dtype = torch.int32 if args.mode == "broadcast" else route_dtype(EXPERTS)
    batch = synthetic_batch(args.samples, args.seq_len, route_dtype=dtype) if rank == 0 else None
    dist.barrier()
    before = _rss_mib()
    start = time.perf_counter()
    out = send_batch(batch, transport=args.mode, dp=dp)
    dist.barrier()
    seconds = time.perf_counter() - start
    record = {"rank": rank, "dp_rank": dp.rank, "rows": out.num_heavy_rows,
              "route_bytes": out.routes_BTLK.nbytes, "route_dtype": str(out.routes_BTLK.dtype),
              "mask_bytes": out.kept_ids_M.nbytes + out.kept_offsets_N1.nbytes,
              "peak_rss_growth_mib": round(_rss_mib() - before, 1), "seconds": round(seconds, 3)}
    print("RESULT " + json.dumps(record), flush=True)
    dist.destroy_process_group()


def launch(args, mode: str) -> list[dict]:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone",
           f"--nproc_per_node={args.world}", str(Path(__file__).resolve()), "--worker",
           "--mode", mode, "--tp", str(args.tp), "--samples", str(args.samples),
           "--seq-len", str(args.seq_len)]
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "MASTER_PORT")}
    env["OMP_NUM_THREADS"] = "1"
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=900)
    records = [json.loads(line.split("RESULT ", 1)[1]) for line in proc.stdout.splitlines()
               if "RESULT " in line]
    if proc.returncode or len(records) != args.world:
        raise SystemExit(f"{mode} run failed ({proc.returncode}):\n{proc.stderr[-4000:]}")
    return sorted(records, key=lambda r: r["rank"])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--world", type=int, default=4)
    parser.add_argument("--tp", type=int, default=2, help="ranks per data-parallel rank")
    parser.add_argument("--samples", type=int, default=64)
    parser.add_argument("--seq-len", type=int, default=1024)
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--mode", choices=("broadcast", "sharded"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.world % args.tp:
        parser.error(f"--tp {args.tp} must divide --world {args.world}")
    if args.worker:
        worker(args)
        return
    result = {"world": args.world, "tp": args.tp, "dp": args.world // args.tp,
              "samples": args.samples, "seq_len": args.seq_len, "layers": LAYERS,
              "experts": EXPERTS, "top_k": TOP_K}
    for mode in ("broadcast", "sharded"):
        result[mode] = launch(args, mode)
    receivers = range(1, args.world)
    for key in ("route_bytes", "mask_bytes", "peak_rss_growth_mib"):
        old = max(result["broadcast"][r][key] for r in receivers)
        new = max(result["sharded"][r][key] for r in receivers)
        result[f"{key}_ratio"] = round(old / new, 2) if new else None
    print(json.dumps(result))


if __name__ == "__main__":
    main()
