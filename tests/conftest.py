import hashlib
import json
import os
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]


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


@pytest.fixture(scope="session")
def warm_model(tmp_path_factory):
    """The tiny Qwen3-MoE with a dense first layer (``tiny``), warm-started on arithmetic until it
    is right about 40% of the time: enough signal for GRPO groups to disagree (the learning test),
    and the model of every end-to-end run (one warm start for all of them)."""
    return cached_warm_start(tmp_path_factory, "warm40", target_accuracy=0.4, variant="tiny")


@pytest.fixture(scope="module")
def one_torch_thread():
    """One intra-op thread: the tiny model's matmuls are far too small for more, and on a shared
    2-core machine extra OpenMP threads only spin. Restored afterwards."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    """A random tiny Qwen3-MoE checkpoint (no warm start), one per test module."""
    from moerl.tiny_model import create_tiny_hf_model

    return create_tiny_hf_model(tmp_path_factory.mktemp("tiny"), seed=0)
