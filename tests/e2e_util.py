"""Shared helpers for the end-to-end tests: a warm-started tiny model and torchrun launches."""

from __future__ import annotations

import hashlib
import json
import math
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def run(cmd: list[str], *, timeout: float, env: dict | None = None,
        check: bool = True) -> subprocess.CompletedProcess:
    """Run ``cmd`` in the repository with a hard timeout (a hang fails), one OpenMP thread per
    process, and none of an enclosing torchrun's rendezvous variables."""
    full_env = {k: v for k, v in os.environ.items()
                if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")}
    full_env.update(OMP_NUM_THREADS="1", **(env or {}))
    proc = subprocess.run(cmd, cwd=REPO, env=full_env, capture_output=True, text=True,
                          timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(f"{cmd[:6]} failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n"
                             f"{proc.stderr[-6000:]}")
    return proc


def torchrun(args: list[str], *, timeout: float, nproc: int = 2, env: dict | None = None,
             check: bool = True) -> subprocess.CompletedProcess:
    """``torchrun --standalone -m moerl.train ARGS``."""
    return run([sys.executable, "-m", "torch.distributed.run", "--standalone",
                f"--nproc_per_node={nproc}", "-m", "moerl.train", *args], timeout=timeout,
               env=env, check=check)


def read_metrics(out_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (out_dir / "metrics.jsonl").read_text().splitlines()]


def finite(value) -> bool:
    return isinstance(value, (int, float)) and math.isfinite(value)


def fast_overrides(model_dir: Path, out_dir: Path, **extra) -> list[str]:
    """Small, fast settings for a few-step run of any preset on the tiny model."""
    settings = {"model.hf_path": model_dir, "training.out_dir": out_dir,
                "rollout.prompts_per_step": 4, "rollout.group_size": 4,
                "training.micro_batch_size": 8, "training.mini_batches": 2,
                "training.eval_every": 0, "training.checkpoint_every": 0,
                "logging.progress": "false", "logging.tensorboard": "false", **extra}
    out = []
    for key, value in settings.items():
        out += ["--set", f"{key}={value}"]
    return out


def cached_warm_start(tmp_path_factory, name: str, *, target_accuracy: float,
                      variant: str) -> Path:
    """A tiny Qwen3-MoE (``variant`` of moerl.tiny_model.TINY_VARIANTS) warm-started on arithmetic
    (the procedure of launch/local.sh) to ``target_accuracy``. tools/test.sh runs pytest several
    times (its steps) and sets ``MOERL_TEST_CACHE`` to a folder that lives as long as that
    command: the checkpoint is made once there, keyed by the warm-start sources and settings,
    under a lock. Without it, a fresh one per
    session."""
    import fcntl

    from moerl.tasks.arithmetic import ArithmeticTask
    from moerl.warmstart import warm_start

    settings = dict(max_operand=30, task_seed=7, target_accuracy=target_accuracy, variant=variant)

    def make(out: Path) -> Path:
        warm_start(out, task=ArithmeticTask(max_operand=settings["max_operand"],
                                            seed=settings["task_seed"]),
                   target_accuracy=target_accuracy, variant=variant, log=lambda *_: None)
        return out

    cache = os.environ.get("MOERL_TEST_CACHE")
    if not cache:
        return make(tmp_path_factory.mktemp(name) / "hf")
    digest = hashlib.sha256(json.dumps(settings, sort_keys=True).encode())
    for source in ("warmstart.py", "tiny_model.py", "tasks/arithmetic.py"):
        digest.update((REPO / "moerl" / source).read_bytes())
    out = Path(cache) / f"{name}-{digest.hexdigest()[:16]}" / "hf"
    out.parent.mkdir(parents=True, exist_ok=True)
    with open(out.parent / "lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not (out / "warmstart.json").exists():  # written last: a finished warm start
            make(out)
    return out
