"""The trainer tools run end to end: ``tools/parity.py`` under torchrun at TP=2/EP=2 on the tiny
Qwen3-MoE (fp32, same weights: log-probs within 1e-4 of HF transformers, every route agreeing)."""

from __future__ import annotations

import json
import sys

import pytest
from e2e_util import REPO, run

from moerl.tiny_model import create_tiny_hf_model




def _json_lines(stdout: str) -> list[dict]:
    return [json.loads(line) for line in stdout.splitlines() if line.startswith("{")]


@pytest.mark.compat
@pytest.mark.timeout(240)
def test_parity_tp2_ep2_matches_hf(tmp_path):
    hf_dir = create_tiny_hf_model(tmp_path / "tiny", seed=5)
    out = run([sys.executable, "-m", "torch.distributed.run", "--standalone",
                "--nproc_per_node", "2", str(REPO / "tools/parity.py"), "--hf", str(hf_dir),
                "--tp", "2", "--ep", "2", "--batch", "3", "--seq", "16"], timeout=200).stdout
    (result,) = _json_lines(out)  # rank 0 only
    assert (result["tp"], result["ep"], result["etp"], result["world"]) == (2, 2, 1, 2)
    assert result["max_abs_logp_diff"] <= 1e-4
    assert result["mean_abs_logp_diff"] <= result["max_abs_logp_diff"]
    assert result["route_agreement"] == 1.0 and result["token_route_mismatch"] == 0.0


@pytest.mark.timeout(120)
def test_bench_trainer_runs_and_masked_memory_tracks_kept_ids():
    out = run([sys.executable, str(REPO / "tools/bench_trainer.py"), "--rounds", "1",
                "--hidden", "64", "--layers", "2", "--experts", "4", "--topk", "2",
                "--expert-ffn", "32", "--model-vocab", "256", "--batch", "2", "--seq", "16",
                "--tokens", "64", "--vocab", "4096", "--kept", "1", "8", "64"], timeout=100).stdout
    (result,) = _json_lines(out)
    for clock in ("wall", "process_cpu"):
        medians = result["replay"][clock]["median_s"]
        assert set(medians) == {"natural", "r3_same_routes", "r3_random_routes"}
        assert all(t > 0 for t in medians.values())
    for clock in ("wall", "process_cpu"):  # bypass mode saves the old-log-prob pass
        bypass = result["bypass"][clock]
        assert bypass["saved_s_per_step"] == bypass["median_s"]["old_logprob_pass"] > 0
        assert 0 < bypass["saved_frac_of_old_pass_plus_update"] < 1
    rows = {row["kept_per_token"]: row for row in result["logprobs"]["rows"]}
    full_fwd = rows["all"]["peak_fwd_bytes"]
    # The unmasked forward holds one fp32 [N, V] temporary; the masked one only O(kept ids).
    assert full_fwd >= result["logprobs"]["tokens_x_vocab_fp32_bytes"]
    assert rows[1]["peak_fwd_bytes"] < rows[8]["peak_fwd_bytes"] < rows[64]["peak_fwd_bytes"]
    assert rows[64]["peak_fwd_bytes"] < full_fwd / 4  # M = N * V / 64
