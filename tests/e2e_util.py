"""Shared helpers for the end-to-end tests: a warm-started tiny model and torchrun launches."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def torchrun(args: list[str], *, timeout: float, nproc: int = 2, env: dict | None = None,
             check: bool = True) -> subprocess.CompletedProcess:
    """``torchrun --standalone -m moerl.train ARGS`` with a hard timeout (a hang fails)."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone",
           f"--nproc_per_node={nproc}", "-m", "moerl.train", *args]
    full_env = {**os.environ, "OMP_NUM_THREADS": "1", **(env or {})}
    proc = subprocess.run(cmd, cwd=REPO, env=full_env, capture_output=True, text=True,
                          timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(f"training failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n"
                             f"{proc.stderr[-6000:]}")
    return proc


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
