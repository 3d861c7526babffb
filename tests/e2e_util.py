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
    process, and none of an enclosing torchrun's rendezvous variables.

    ``python -m torch.distributed.run --standalone --nproc_per_node=N (-m MODULE | SCRIPT) ARGS``
    goes to the test fork server (tests/forkserver.py: torchrun's semantics, without every worker
    importing torch and megatron-core again) unless ``MOERL_TEST_LAUNCHER=torchrun``."""
    full_env = {k: v for k, v in os.environ.items()
                if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")}
    full_env.update(OMP_NUM_THREADS="1", **(env or {}))
    job = _torchrun_job(cmd)
    if job is not None and os.environ.get("MOERL_TEST_LAUNCHER", "forkserver") != "torchrun":
        proc = _fork_server().run(cmd, job, env=full_env, timeout=timeout)
    else:
        proc = subprocess.run(cmd, cwd=REPO, env=full_env, capture_output=True, text=True,
                              timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(f"{cmd[:6]} failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n"
                             f"{proc.stderr[-6000:]}")
    return proc


def _torchrun_job(cmd: list[str]) -> dict | None:
    """The job of a ``torch.distributed.run --standalone`` command line, or None for any other
    command (or torchrun options the fork server does not implement)."""
    if cmd[:3] != [sys.executable, "-m", "torch.distributed.run"]:
        return None
    rest, nproc, standalone = list(cmd[3:]), None, False
    while rest and rest[0].startswith("--"):
        opt = rest.pop(0)
        if opt == "--standalone":
            standalone = True
        elif opt.startswith("--nproc_per_node=") or opt.startswith("--nproc-per-node="):
            nproc = opt.split("=", 1)[1]
        elif opt in ("--nproc_per_node", "--nproc-per-node") and rest:
            nproc = rest.pop(0)
        else:
            return None
    if not (standalone and nproc and nproc.isdigit() and rest):
        return None
    if rest[0] == "-m":
        return {"module": True, "target": rest[1], "args": rest[2:], "nproc": int(nproc)}
    return {"module": False, "target": rest[0], "args": rest[1:], "nproc": int(nproc)}


class _ForkServer:
    """The pytest process's fork server (started on first use, stopped at exit)."""

    def __init__(self):
        import atexit
        import tempfile

        self.dir = tempfile.mkdtemp(prefix="moerl-forkserver-")
        self.path = os.path.join(self.dir, "sock")
        self.jobs = 0
        env = {**os.environ, "OMP_NUM_THREADS": "1"}
        self.proc = subprocess.Popen([sys.executable, str(REPO / "tests" / "forkserver.py"),
                                      self.path], cwd=REPO, env=env, stdout=subprocess.PIPE,
                                     text=True)
        atexit.register(self.close)
        if self.proc.stdout.readline().strip() != "ready":
            raise RuntimeError(f"the test fork server did not start (exit {self.proc.wait()})")

    def close(self) -> None:
        import shutil

        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        shutil.rmtree(self.dir, ignore_errors=True)

    def run(self, cmd: list[str], job: dict, *, env: dict,
            timeout: float) -> subprocess.CompletedProcess:
        import signal
        import socket
        import time

        self.jobs += 1
        stem = os.path.join(self.dir, f"job{self.jobs}")
        job = {**job, "env": env, "cwd": str(REPO), "stdout": stem + ".out",
               "stderr": stem + ".err", "run_id": f"moerl-test-{os.getpid()}-{self.jobs}"}
        deadline = time.monotonic() + timeout
        pgid = None
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as conn:
            conn.connect(self.path)
            conn.sendall((json.dumps(job) + "\n").encode())
            reader = conn.makefile("r")
            try:
                conn.settimeout(max(1.0, deadline - time.monotonic()))
                pgid = json.loads(reader.readline())["pgid"]
                conn.settimeout(max(1.0, deadline - time.monotonic()))
                line = reader.readline()
                if not line:
                    raise RuntimeError("the test fork server's supervisor died")
                returncode = json.loads(line)["returncode"]
            except BaseException as exc:  # a timeout, or pytest's own (as subprocess.run does)
                if pgid is not None:
                    try:
                        os.killpg(pgid, signal.SIGKILL)
                    except ProcessLookupError:
                        pass
                if isinstance(exc, (TimeoutError, socket.timeout)):
                    raise subprocess.TimeoutExpired(cmd, timeout, output=_read(job["stdout"]),
                                                    stderr=_read(job["stderr"])) from None
                raise
        proc = subprocess.CompletedProcess(cmd, returncode, _read(job["stdout"]),
                                           _read(job["stderr"]))
        for path in (job["stdout"], job["stderr"]):
            if os.path.exists(path):
                os.unlink(path)
        return proc


def _read(path: str) -> str:
    try:
        with open(path, errors="replace") as f:
            return f.read()
    except FileNotFoundError:
        return ""


_SERVER: list[_ForkServer] = []


def _fork_server() -> _ForkServer:
    if not _SERVER or _SERVER[0].proc.poll() is not None:
        _SERVER[:] = [_ForkServer()]
    return _SERVER[0]


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

    import torch

    # One intra-op thread, whatever the test process has: the warm start's float sums (and so
    # the model every test using it gets) depend on the thread count. tools/test.sh's
    # OMP_NUM_THREADS=1 warm start made test_learning's model learn; a plain pytest's 2-thread
    # one did not (0.461 -> 0.469 in 30 steps).
    settings = dict(max_operand=30, task_seed=7, target_accuracy=target_accuracy, variant=variant,
                    threads=1)

    def make(out: Path) -> Path:
        before = torch.get_num_threads()
        torch.set_num_threads(settings["threads"])
        try:
            warm_start(out, task=ArithmeticTask(max_operand=settings["max_operand"],
                                                seed=settings["task_seed"]),
                       target_accuracy=target_accuracy, variant=variant, log=lambda *_: None)
        finally:
            torch.set_num_threads(before)
        return out

    cache = os.environ.get("MOERL_TEST_CACHE")
    if not cache:
        return make(tmp_path_factory.mktemp(name) / "hf")
    # Keyed by the stack as well: tools/test.sh's compatibility step (another Python, torch and
    # transformers) runs beside step 1 and makes its own, rather than waiting for step 1's lock
    # or handing step 1 a checkpoint whose float sums another stack made.
    import transformers

    stack = {"python": sys.version_info[:2], "torch": torch.__version__,
             "transformers": transformers.__version__}
    digest = hashlib.sha256(json.dumps({**settings, **stack}, sort_keys=True).encode())
    for source in ("warmstart.py", "tiny_model.py", "tasks/arithmetic.py"):
        digest.update((REPO / "moerl" / source).read_bytes())
    out = Path(cache) / f"{name}-{digest.hexdigest()[:16]}" / "hf"
    out.parent.mkdir(parents=True, exist_ok=True)
    with open(out.parent / "lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not (out / "warmstart.json").exists():  # written last: a finished warm start
            make(out)
    return out
