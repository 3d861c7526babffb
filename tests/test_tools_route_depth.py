"""tools/route_depth.py: the depth sweep of the bf16-engine vs fp32-trainer mismatch."""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tools"))

import route_depth  # noqa: E402


def test_sweep_measures_every_depth_and_a_trained_checkpoint(tmp_path):
    from moerl.tiny_model import TINY_VARIANTS, create_tiny_hf_model

    trained = create_tiny_hf_model(tmp_path / "ckpt", seed=4,
                                   **dict(TINY_VARIANTS["deep_moe"], num_hidden_layers=3))
    assert route_depth.main(["--out", str(tmp_path / "out"), "--layers", "1", "3", "--seeds",
                             "1", "2", "--num-prompts", "24", "--variants", "deep_moe",
                             "deep_moe128", "--model", str(trained)]) == 0
    result = json.loads((tmp_path / "out" / "route_depth.json").read_text())
    rows = result["rows"]
    assert [(r["model"], r["layers"], r["seeds"]) for r in rows] == [
        ("random deep_moe", 1, [1, 2]), ("random deep_moe", 3, [1, 2]),
        ("random deep_moe128", 1, [1, 2]), ("random deep_moe128", 3, [1, 2]),
        (str(trained), 3, [])]
    # 128 experts with top-16 put the k-th and (k+1)-th router scores closer together than 64
    # with top-8: bf16 flips more of its decisions, at every depth.
    for shallow, wide in ((rows[0], rows[2]), (rows[1], rows[3])):
        assert wide["flip"][0] > shallow["flip"][0]
    for r in rows:
        assert 0.0 <= r["rerouted"][0] <= 1.0 and 0.0 <= r["flip"][0] <= 1.0
        assert r["kl"][0] > 0.0  # bf16 never reproduces fp32 exactly
    # One MoE layer: a token is rerouted exactly when its one routing decision flips.
    one = rows[0]
    assert one["rerouted"][0] == pytest.approx(one["flip"][0], abs=1e-4)
    assert one["independent"][0] == pytest.approx(one["flip"][0], abs=1e-12)
    # More layers, more chances to flip: every seed's 3-layer model reroutes at least as many
    # tokens as a single layer's flip rate would (the union over layers covers each layer).
    assert rows[1]["rerouted"][0] >= rows[1]["flip"][0] - 1e-4
    table = (tmp_path / "out" / "route_depth.md").read_text()
    assert str(trained) in table and "random deep_moe128" in table
    assert (tmp_path / "out" / "route_depth.png").stat().st_size > 0


def test_bad_arguments_are_named(tmp_path, capsys):
    with pytest.raises(SystemExit):
        route_depth.main(["--out", str(tmp_path), "--layers", "0"])
    assert "--layers must be positive" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        route_depth.main(["--out", str(tmp_path), "--model", str(tmp_path / "nowhere")])
    assert "no config.json" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        route_depth.main(["--out", str(tmp_path), "--variants", "deep_moe", "huge_moe"])
    assert "huge_moe" in capsys.readouterr().err


def test_spread_ignores_empty_groups():
    assert route_depth._spread([0.5, math.nan, 1.5]) == (1.0, pytest.approx(0.7071, abs=1e-4))
    mean, std = route_depth._spread([math.nan])
    assert math.isnan(mean) and math.isnan(std)
