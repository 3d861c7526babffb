"""The moerl command: dispatch, plot, and its error paths (the torchrun subcommands run in
tests/test_byo_e2e.py)."""

import json
import subprocess
import sys

import pytest

from moerl.cli import REPO, main
from moerl.plot import choose, plot_run, read_series


def test_usage_and_unknown_command(capsys):
    assert main([]) == 2
    assert "moerl export RUN_DIR --step N --out DIR" in capsys.readouterr().err
    assert main(["trian"]) == 2
    assert "unknown command 'trian'; choose one of ['train', 'serve'" in capsys.readouterr().err


def test_the_console_script_is_installed():
    proc = subprocess.run([sys.executable, "-c", "from importlib.metadata import entry_points; "
                           "print([e.value for e in entry_points(group='console_scripts') "
                           "if e.name == 'moerl'])"], capture_output=True, text=True)
    assert proc.stdout.strip() == "['moerl.cli:main']"


def test_train_validates_before_starting_processes(capsys):
    assert main(["train", "--set", "training.lrr=1"]) == 2
    assert "unknown key(s) ['lrr'] in training" in capsys.readouterr().err


def test_plot(tmp_path):
    records = [{"step": s, "score/mean": 0.1 * s, "eval/pass@4": 0.5, "eval/mean@4": 0.2,
                "grad_norm": float("nan") if s == 2 else 1.0, "note": "text"} for s in range(5)]
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    series = read_series(tmp_path)
    assert len(series["grad_norm"]) == 4 and "note" not in series  # non-finite, non-numeric out
    assert choose(series, ("score/mean", "eval/pass@*", "missing")) == ["score/mean",
                                                                       "eval/pass@4"]
    assert main(["plot", str(tmp_path)]) == 0
    assert (tmp_path / "metrics.png").stat().st_size > 5_000
    out = plot_run(tmp_path, metrics=("grad_norm",), out=tmp_path / "g.png")
    assert out.is_file()
    with pytest.raises(ValueError, match=r"none of \['loss'\] is in"):
        plot_run(tmp_path, metrics=("loss",))


def test_plot_and_export_errors(tmp_path, capsys):
    assert main(["plot", str(tmp_path)]) == 2
    assert "has no metrics.jsonl" in capsys.readouterr().err
    (tmp_path / "checkpoints" / "step_000004").mkdir(parents=True)
    (tmp_path / "checkpoints" / "step_000004" / "meta.json").write_text("{}")
    assert main(["export", str(tmp_path), "--step", "2", "--out", str(tmp_path / "x")]) == 2
    assert "has no checkpoint of step 2; saved steps: [4]" in capsys.readouterr().err


def test_plan_through_the_moerl_command():
    """`moerl plan` runs tools/plan.py with its arguments (the README's example)."""
    proc = subprocess.run(
        [sys.executable, "-m", "moerl.cli", "plan", "configs/grpo.yaml",
         "configs/models/qwen3_30b_a3b_2x8.yaml", "--hf-config",
         "configs/models/qwen3_30b_a3b.hf_config.json", "--world", "16"],
        capture_output=True, text=True, timeout=300, cwd=REPO)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "model: 30.53B parameters, 3.35B active per token" in proc.stdout
