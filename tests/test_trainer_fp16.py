"""model.dtype=float16 (issue 10): Megatron's fp16 trainer with dynamic loss scaling on GPU,
refused on CPU with a clear error (megatron-core's mixed-precision optimizer needs CUDA)."""

from __future__ import annotations

import pytest
import torch

from e2e_util import fast_overrides, finite, read_metrics, torchrun


@pytest.mark.skipif(torch.cuda.is_available(), reason="the CPU refusal")
def test_fp16_trainer_is_refused_on_cpu():
    from moerl.trainer.optimizer import build_optimizer

    with pytest.raises(ValueError, match=r"fp16=True.*need CUDA.*model.dtype=float32"):
        build_optimizer(torch.nn.Linear(2, 2), None, None, lr=1e-3, fp16=True)


@pytest.mark.skipif(torch.cuda.is_available(), reason="the CPU refusal")
def test_train_refuses_fp16_on_cpu_before_any_work(tmp_path):
    import subprocess
    import sys

    from e2e_util import REPO

    proc = subprocess.run([sys.executable, "-m", "moerl.train", "configs/grpo.yaml", "--set",
                           "model.dtype=float16", "--set", f"training.out_dir={tmp_path}"],
                          cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "model.dtype=float16 needs CUDA" in proc.stderr
    assert not any(tmp_path.iterdir())  # nothing started, nothing written


def test_precision_flags_pick_one_parameter_dtype():
    from moerl.trainer.model import param_dtype

    assert param_dtype(bf16=False, fp16=False) == torch.float32
    assert param_dtype(bf16=True, fp16=False) == torch.bfloat16
    assert param_dtype(bf16=False, fp16=True) == torch.float16
    with pytest.raises(ValueError, match="one of bf16 and fp16"):
        param_dtype(bf16=True, fp16=True)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_fp16_trainer_steps_on_one_gpu(warm_model, tmp_path):
    """fp16 parameters, loss scaled before backward, fp32 main weights: updates land (an early
    loss-scale overflow may skip a step, never all of them) and the loss stays finite."""
    out = tmp_path / "run"
    torchrun(["configs/grpo.yaml", *fast_overrides(
        warm_model, out, **{"training.steps": 3, "parallel.tp": 1, "parallel.ep": 1,
                            "model.dtype": "float16"})], nproc=1, timeout=900)
    records = read_metrics(out)
    assert all(finite(r["loss"]) for r in records)
    assert sum(r["skipped"] for r in records) < 2 * len(records)  # 2 mini-batches per step
