"""``moerl plot RUN_DIR``: a figure of a run's metrics (``RUN_DIR/metrics.png``).

One panel per metric, against the RL step, read from ``metrics.jsonl``: by default the headline
metrics the run has (score, evaluation, mismatch, routing agreement, clipping, gradient norm,
response length, entropy), or the ones named with ``--metrics``.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

DEFAULT_METRICS = ("score/mean", "eval/accuracy", "eval/pass@*", "eval/mean@*", "reward/errors",
                   "mismatch/k3", "mismatch/abs_max", "routing/route_agreement", "clipfrac",
                   "grad_norm", "response_length/mean", "entropy/old", "loss", "time/step")


def read_series(run_dir: Path) -> dict[str, list[tuple[int, float]]]:
    """``metric -> [(step, value)]`` for every finite numeric metric of the run."""
    path = run_dir / "metrics.jsonl"
    if not path.is_file():
        raise ValueError(f"{run_dir} has no metrics.jsonl: is it a moerl run directory "
                         f"(training.out_dir)?")
    series: dict[str, list[tuple[int, float]]] = {}
    for line in path.read_text().splitlines():
        record = json.loads(line)
        for key, value in record.items():
            if key != "step" and isinstance(value, (int, float)) and math.isfinite(value):
                series.setdefault(key, []).append((record["step"], float(value)))
    return series


def choose(series: dict, wanted: tuple[str, ...]) -> list[str]:
    """The metrics of ``wanted`` the run has (``prefix*`` patterns match by prefix)."""
    names = []
    for pattern in wanted:
        matches = ([k for k in sorted(series) if k.startswith(pattern[:-1])]
                   if pattern.endswith("*") else [pattern] if pattern in series else [])
        names += [m for m in matches if m not in names]
    return names


def plot_run(run_dir: Path, *, metrics: tuple[str, ...] = DEFAULT_METRICS,
             out: Path | None = None) -> Path:
    try:
        import matplotlib
    except ImportError:
        raise ValueError("moerl plot needs matplotlib: pip install matplotlib") from None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    series = read_series(run_dir)
    names = choose(series, metrics)
    if not names:
        raise ValueError(f"none of {list(metrics)} is in {run_dir}/metrics.jsonl; it has "
                         f"{sorted(series)}")
    cols = min(3, len(names))
    rows = -(-len(names) // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4.2 * cols, 2.8 * rows), squeeze=False)
    for ax, name in zip(axes.flat, names):
        steps, values = zip(*series[name])
        ax.plot(steps, values, marker="o" if len(steps) < 20 else None, linewidth=1.4)
        ax.set_title(name, fontsize=10)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
    for ax in list(axes.flat)[len(names):]:
        ax.axis("off")
    fig.suptitle(str(run_dir), fontsize=10)
    fig.tight_layout()
    out = out or run_dir / "metrics.png"
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out
