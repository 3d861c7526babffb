"""An RL run on the DeepSeek-V3 tiny model (MLA, YaRN, sigmoid router with expert bias and grouped
top-k, odd vocabulary) with ``--keep-routing --keep-sampling-mask`` at TP=2/EP=2 against the
built-in fp32 engine: the trainer's old log-probs equal the rollout's within 1e-5 and its routes
equal the engine's (agreement 1.0) at every step; weight pushes carry the router's
``e_score_correction_bias`` buffer."""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from e2e_util import fast_overrides, finite, read_metrics, torchrun  # noqa: E402
from family_models import make_deepseek_v3  # noqa: E402


def test_deepseek_v3_keep_routing_keep_mask_tp2_ep2(tmp_path):
    # The arithmetic task's tokenizer has 64 ids; 67 keeps the vocabulary odd.
    ckpt = make_deepseek_v3(tmp_path / "dsv3", vocab_size=67)
    out = tmp_path / "run"
    torchrun(["configs/grpo.yaml", "--keep-routing", "--keep-sampling-mask",
              *fast_overrides(ckpt, out, **{"training.steps": 3, "rollout.top_p": 0.95})],
             timeout=600)
    records = read_metrics(out)
    assert [r["step"] for r in records] == [0, 1, 2]
    for r in records:
        assert r["mismatch/abs_mean"] <= 1e-5, r["mismatch/abs_mean"]
        assert r["routing/route_agreement"] == 1.0, r["routing/route_agreement"]
        assert r["skipped"] == 0 and finite(r["grad_norm"])
