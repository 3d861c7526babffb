"""GPU paths: Transformer Engine layer specs, NCCL, CUDA devices. Marked ``gpu``; skipped on a
machine without CUDA (this repository's CI), run with ``pytest -m gpu`` where a GPU exists."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

from e2e_util import REPO, fast_overrides, finite, read_metrics, torchrun

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]


def test_te_spec_model_matches_hf_on_gpu(tmp_path):
    """One GPU, TP=1: the Transformer Engine layer spec (grouped-GEMM experts, fused norms)
    loads the same HF weights and agrees with transformers' log-probs and routes."""
    from moerl.tiny_model import create_tiny_hf_model
    from moerl.trainer.model import use_transformer_engine

    if not use_transformer_engine():
        pytest.skip("transformer_engine is not installed")
    hf = create_tiny_hf_model(tmp_path / "hf")
    proc = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=1",
         "tools/parity.py", "--hf", str(hf), "--tp", "1", "--ep", "1"], cwd=REPO,
        capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    # TE may use TF32 for fp32 GEMMs: looser than the CPU test's 1e-4.
    assert result["max_abs_logp_diff"] < 2e-2, result
    assert result["route_agreement"] > 0.99, result


def test_rl_steps_on_one_gpu(warm_model, tmp_path):
    """GRPO with keep-routing on one GPU: CUDA tensors through replay, log-probs, the NCCL
    weight push to the built-in server, and the optimizer."""
    out = tmp_path / "run"
    torchrun(["configs/grpo.yaml", "--keep-routing", *fast_overrides(
        warm_model, out, **{"training.steps": 2, "parallel.tp": 1, "parallel.ep": 1})],
             nproc=1, timeout=900)
    records = read_metrics(out)
    assert [r["step"] for r in records] == [0, 1]
    assert all(finite(r["loss"]) and finite(r["mismatch/k3"]) for r in records)
