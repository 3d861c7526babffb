"""Prove moerl's GPU paths on one CUDA GPU in minutes; one JSON summary on stdout.

    tools/gpu_check.sh [OUT_DIR]          # installs the carried wheels, then runs this
    python tools/gpu_check.py --out DIR [--only NAME ...]

Checks (each a subprocess with its own time limit; logs in OUT_DIR/<name>.log):
  env               torch, CUDA device, megatron-core versions
  host_collectives  init_parallel's default group (``cpu:gloo,cuda:nccl`` with CUDA): the loop's
                    host collectives (batch and JSON broadcast, sharded transport, data-parallel
                    gathers and means) and a CUDA all-reduce on the same group
  tiny_model        a random tiny Qwen3-MoE (seconds; a warm start is minutes of CPU training and
                    the paths, not the rewards, are under test)
  parity_fp32/bf16  Megatron model vs Hugging Face transformers on the trainer's device
  rl_fp32_trainer   3 GRPO steps with keep-routing at world 1: built-in server with a bf16 engine,
                    fp32 trainer, NCCL weight push (weight_sync.method=distributed)
  rl_bf16_distopt   the same with a bf16 trainer (Megatron mixed precision) and the distributed
                    optimizer
Per RL check: peak GPU memory (torch.cuda.max_memory_allocated) and the median step time.
On a machine without CUDA the checks still run where they can, on CPU, and say so.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
RL_COMMON = ["configs/grpo.yaml", "--keep-routing", "--set", "parallel.tp=1", "--set",
             "parallel.ep=1", "--set", "training.steps=3", "--set", "training.eval_every=0",
             "--set", "training.checkpoint_every=0", "--set", "logging.progress=false",
             "--set", "logging.tensorboard=false", "--set", "rollout.engine_dtype=bfloat16",
             "--set", "weight_sync.method=distributed"]


def _run(name: str, cmd: list[str], out: Path, timeout: float) -> tuple[int, str, float]:
    """Run ``cmd``; its output goes to ``out/<name>.log``; returns (rc, last JSON line, seconds)."""
    env = {**os.environ, "OMP_NUM_THREADS": "4", "PYTHONUNBUFFERED": "1"}
    start = time.monotonic()
    with open(out / f"{name}.log", "w") as log:
        try:
            rc = subprocess.run(cmd, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT,
                                timeout=timeout).returncode
        except subprocess.TimeoutExpired:
            rc = 124
    text = (out / f"{name}.log").read_text(errors="replace")
    json_lines = [line for line in text.splitlines() if line.startswith("{")]
    return rc, json_lines[-1] if json_lines else "", round(time.monotonic() - start, 1)


def _result(name: str, cmd: list[str], out: Path, timeout: float) -> dict:
    rc, line, seconds = _run(name, cmd, out, timeout)
    result = {"ok": rc == 0, "rc": rc, "seconds": seconds}
    if line:
        result.update(json.loads(line))
    if rc:
        tail = (out / f"{name}.log").read_text(errors="replace").strip().splitlines()[-6:]
        result["log_tail"] = tail
    return result


def check_env() -> dict:
    import torch

    info = {"ok": True, "torch": torch.__version__, "cuda": torch.cuda.is_available()}
    if info["cuda"]:
        info.update(device=torch.cuda.get_device_name(0), cuda_version=torch.version.cuda)
    try:
        import megatron.core

        info["megatron_core"] = megatron.core.__version__
    except ImportError as err:
        info.update(ok=False, megatron_core=f"missing: {err}")
    return info


def host_collectives() -> None:
    """Child process: the loop's host collectives on the groups init_parallel builds."""
    import torch
    import torch.distributed as dist

    from moerl.batch import broadcast_batch, broadcast_json
    from moerl.batch_transport import send_batch
    from moerl.data_parallel import DataParallel
    from moerl.trainer.parallel import destroy_parallel, init_parallel

    sys.path.insert(0, str(REPO / "tests" / "dist"))
    from transport_check import samples  # the transport test's synthetic samples

    from moerl.batch import pack_samples
    from moerl.tiny_model import TINY_QWEN3_MOE
    from moerl.trainer.model import architecture_from_hf

    layout, groups = init_parallel(tp=1, ep=1, etp=1, seed=0, timeout_s=120)
    dp = DataParallel.from_layout(layout, groups)
    arch = architecture_from_hf({**TINY_QWEN3_MOE, "model_type": "qwen3_moe"})
    batch = pack_samples(samples(6, arch), pad_id=0, arch=arch)
    done = []
    broadcast_json({"a": 1}, src=0, group=groups.world)
    done.append("broadcast_json")
    broadcast_batch(batch, src=0, group=groups.world)
    done.append("broadcast_batch")
    send_batch(batch, transport="sharded", dp=dp, world_group=groups.world)
    done.append("send_batch")
    dp.gather_rows(torch.zeros(6, 4))
    dp.mean_metrics({"x": 1.0})
    done.append("data_parallel")
    if torch.cuda.is_available():
        flag = torch.ones(1, device="cuda")
        dist.all_reduce(flag, group=groups.world)
        done.append("cuda_all_reduce")
    print(json.dumps({"backend": dist.get_backend_config(), "passed": done}), flush=True)
    destroy_parallel()


def train_child(argv: list[str]) -> None:
    """Child process: ``moerl.train`` in this process (a world of one), then peak GPU memory."""
    import torch

    from moerl.train import main

    rc = main(argv)
    peak = torch.cuda.max_memory_allocated() / 2**30 if torch.cuda.is_available() else None
    print(json.dumps({"train_rc": rc, "peak_gpu_gib": peak}), flush=True)
    sys.exit(rc)


def rl_check(name: str, out: Path, warm: Path, extra: list[str], timeout: float) -> dict:
    run_dir = out / name
    cmd = [sys.executable, __file__, "--train-child", "--", *RL_COMMON, "--set",
           f"model.hf_path={warm}", "--set", f"training.out_dir={run_dir}", *extra]
    result = _result(name, cmd, out, timeout)
    metrics_file = run_dir / "metrics.jsonl"
    if metrics_file.exists():
        records = [json.loads(line) for line in metrics_file.read_text().splitlines()]
        steps = [r["time/step"] for r in records if "time/step" in r]
        result.update(steps=len(records),
                      median_step_s=statistics.median(steps[1:] or steps) if steps else None,
                      weight_sync_s=[r.get("time/weight_sync") for r in records],
                      mismatch_k3=[r.get("mismatch/k3") for r in records])
        result["ok"] = result["ok"] and len(records) == 3
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=Path("/tmp/moerl_gpu_check"))
    parser.add_argument("--only", nargs="*", help="run only these checks")
    parser.add_argument("--host-collectives-child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--train-child", action="store_true", help=argparse.SUPPRESS)
    args, rest = parser.parse_known_args()
    if args.host_collectives_child:
        return host_collectives()
    if args.train_child:
        return train_child(rest[1:] if rest[:1] == ["--"] else rest)
    out = args.out
    out.mkdir(parents=True, exist_ok=True)
    wanted = (lambda name: not args.only or name in args.only)
    warm = out / "tiny_model"
    summary: dict = {"started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    start = time.monotonic()
    summary["env"] = check_env()
    if wanted("host_collectives"):
        summary["host_collectives"] = _result(
            "host_collectives", [sys.executable, __file__, "--host-collectives-child"], out, 180)
    if not (warm / "config.json").exists():
        summary["tiny_model"] = _result("tiny_model", [
            sys.executable, "-c", "import sys; from moerl.tiny_model import create_tiny_hf_model; "
            "create_tiny_hf_model(sys.argv[1], seed=0)", str(warm)], out, 120)
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone",
                "--nproc_per_node=1", "tools/parity.py", "--hf", str(warm)]
    for dtype, flag in (("fp32", []), ("bf16", ["--bf16"])):
        if wanted(f"parity_{dtype}"):
            summary[f"parity_{dtype}"] = _result(f"parity_{dtype}", torchrun + flag, out, 240)
    if wanted("rl_fp32_trainer"):
        summary["rl_fp32_trainer"] = rl_check("rl_fp32_trainer", out, warm, [], 420)
    if wanted("rl_bf16_distopt"):
        summary["rl_bf16_distopt"] = rl_check(
            "rl_bf16_distopt", out, warm, ["--set", "model.dtype=bfloat16", "--set",
                                           "parallel.distributed_optimizer=true"], 420)
    checks = [v for k, v in summary.items() if isinstance(v, dict)]
    summary.update(all_ok=all(c.get("ok") for c in checks),
                   seconds=round(time.monotonic() - start, 1))
    print(json.dumps(summary), flush=True)


if __name__ == "__main__":
    main()
