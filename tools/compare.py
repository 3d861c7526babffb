"""The comparison moerl exists for: GRPO with keep-routing vs GSPO without routing replay.

    python tools/compare.py --out runs/compare [--quick] [--seeds 1 2 3] [--arms ...]
                            [--engine builtin|sglang]

Runs every arm with the same seeds, each as a real training run (torchrun, TP=2/EP=2, built-in
rollout server), under settings that make the train/rollout mismatch real: a bf16 rollout engine
against an fp32 trainer, top-p sampling, several mini-batch updates per rollout (off-policy).
``--engine sglang`` makes the rollout engine a real SGLang 0.5.23 server that each run starts
(``rollout.server=sglang``; ``launch/setup_sglang.sh`` first on a CPU machine): a second
implementation of the model, as at scale. SGLang serves only all-MoE Qwen3-MoE checkpoints, so
the models are then the ``tiny_moe`` / ``wide_moe`` variants, and it returns sampling masks only
for a finite top-k, so top-k is set to the vocabulary size (which truncates nothing: the arms
sample with the same top-p as with the built-in engine).
Writes, under ``--out``:

    <arm>/seed<k>/metrics.jsonl      the telemetry series of each run (resumable run directories)
    summary.md                       mean and spread over seeds per arm
    summary.json                     the same numbers, machine-readable
    curves.png                       the series over steps, arms overlaid (mean, min-max band)

Resumable: a run with a ``done.json`` is not rerun; an interrupted run resumes from its last
checkpoint. ``--quick`` (tiny model, 2 seeds, 10 steps, 4 arms) finishes in under 10 minutes on a
2-core CPU; the default uses the "wide" tiny model (5 layers, 32 experts top-4), whose routing
is fragile enough under bf16 for replay to matter.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

# name -> (preset, extra flags, description)
ARMS = {
    "grpo_r3_mask": ("grpo", ["--keep-routing", "--keep-sampling-mask"],
                     "GRPO + keep routing (R3) + keep sampling mask"),
    "gspo": ("gspo", ["--routing-replay", "none", "--no-keep-sampling-mask"],
             "GSPO, no routing replay"),
    "grpo": ("grpo", ["--routing-replay", "none", "--no-keep-sampling-mask"],
             "GRPO, no replay (control)"),
    "grpo_r2": ("grpo", ["--routing-replay", "r2", "--no-keep-sampling-mask"],
                "GRPO + R2 (replay the trainer's own routes)"),
    "gspo_r3": ("gspo", ["--keep-routing", "--no-keep-sampling-mask"], "GSPO + keep routing"),
    # Attribution: the first arm changes two things at once; this one changes only the mask.
    "grpo_mask": ("grpo", ["--routing-replay", "none", "--keep-sampling-mask"],
                  "GRPO + keep sampling mask, no replay"),
}
DEFAULT_ARMS = ["grpo_r3_mask", "gspo", "grpo", "grpo_r2", "gspo_r3", "grpo_mask"]
QUICK_ARMS = ["grpo_r3_mask", "gspo", "grpo", "grpo_r2"]

# Settings shared by every arm: where the mismatch comes from.
MISMATCH_SETTINGS = {
    "rollout.engine_dtype": "bfloat16",
    "rollout.top_p": 0.9,
    "training.mini_batches": 4,
}

SERIES = [("score/mean", "sample accuracy"), ("eval/accuracy", "greedy eval accuracy"),
          ("mismatch/k3", "train/rollout k3 KL"), ("mismatch/extreme_frac",
                                                    "extreme-token fraction"),
          ("routing/token_route_mismatch", "tokens routed differently (any layer)"),
          ("clipfrac", "clip fraction"), ("grad_norm", "grad norm")]


def engine_settings(engine: str, model: Path) -> dict:
    """The rollout settings that select ``engine`` (see the module docstring)."""
    if engine == "builtin":
        return {}
    vocab = json.loads((model / "config.json").read_text())["vocab_size"]
    return {"rollout.server": "sglang", "rollout.top_k": vocab}


def run_one(arm: str, seed: int, *, out: Path, model: Path, steps: int, eval_every: int,
            log, engine: str = "builtin") -> Path:
    run_dir = out / arm / f"seed{seed}"
    if (run_dir / "done.json").exists():
        log(f"{arm} seed {seed}: done, skipped")
        return run_dir
    preset, flags, _ = ARMS[arm]
    settings = {**MISMATCH_SETTINGS, **engine_settings(engine, model),
                "model.hf_path": model, "training.out_dir": run_dir,
                "training.steps": steps, "training.eval_every": eval_every,
                "training.checkpoint_every": 5, "training.resume": "true",
                "rollout.seed": 1000 + seed, "training.seed": seed,
                "logging.progress": "false"}
    args = [f"configs/{preset}.yaml", *flags]
    for key, value in settings.items():
        args += ["--set", f"{key}={value}"]
    run_dir.mkdir(parents=True, exist_ok=True)
    started = time.time()
    log(f"{arm} seed {seed}: training {steps} steps ...")
    with open(run_dir / "train.log", "w") as fh:
        proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone",
                               "--nproc_per_node=2", "-m", "moerl.train", *args], cwd=REPO,
                              stdout=fh, stderr=subprocess.STDOUT,
                              env={**os.environ, "OMP_NUM_THREADS": "1"})
    if proc.returncode:
        raise RuntimeError(f"{arm} seed {seed} failed; see {run_dir / 'train.log'}")
    seconds = round(time.time() - started, 1)
    (run_dir / "done.json").write_text(json.dumps({"seconds": seconds}))
    log(f"{arm} seed {seed}: {seconds} s")
    return run_dir


def read_series(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def run_stats(records: list[dict]) -> dict[str, float]:
    """One run's summary numbers."""
    train = [r for r in records if "score/mean" in r]
    evals = [r["eval/accuracy"] for r in records if "eval/accuracy" in r]
    last = train[-min(5, len(train)):]
    grad = [r["grad_norm"] for r in train if math.isfinite(r["grad_norm"])]
    median = statistics.median(grad) if grad else float("nan")

    def mean(key, rows=train):
        values = [r[key] for r in rows if isinstance(r.get(key), (int, float))]
        return statistics.fmean(values) if values else float("nan")

    return {
        "initial_accuracy": evals[0] if evals else float("nan"),
        "final_accuracy": evals[-1] if evals else float("nan"),
        "reward_last5": mean("score/mean", last),
        "k3": mean("mismatch/k3"),
        "abs_logp_diff": mean("mismatch/abs_mean"),
        "extreme_frac": mean("mismatch/extreme_frac"),
        "route_agreement": mean("routing/route_agreement"),
        "token_route_mismatch": mean("routing/token_route_mismatch"),
        "clipfrac": mean("clipfrac"),
        "seq_clipfrac": mean("seq_clipfrac"),
        # A spike: a step whose gradient norm exceeds 5x the run's median.
        "grad_spikes": float(sum(g > 5 * median for g in grad)),
        # A collapse: the run ends below half its starting greedy accuracy.
        "collapsed": float(bool(evals) and evals[-1] < 0.5 * evals[0]),
        "skipped_steps": sum(r.get("skipped", 0) for r in train),
    }


def summarize(out: Path, arms: list[str], seeds: list[int]) -> dict:
    summary = {}
    for arm in arms:
        per_seed = [run_stats(read_series(out / arm / f"seed{s}")) for s in seeds]
        summary[arm] = {}
        for key in per_seed[0]:
            values = [p[key] for p in per_seed]
            if key in ("grad_spikes", "collapsed", "skipped_steps"):
                summary[arm][key] = {"total": sum(values), "per_seed": values}
            else:
                finite = [v for v in values if math.isfinite(v)]
                summary[arm][key] = {
                    "mean": statistics.fmean(finite) if finite else float("nan"),
                    "std": statistics.stdev(finite) if len(finite) > 1 else 0.0,
                    "per_seed": values}
    return summary


def markdown(summary: dict, seeds: list[int]) -> str:
    cols = [("final_accuracy", "final eval acc", "{:.3f}"), ("reward_last5", "reward (last 5)",
                                                             "{:.3f}"),
            ("k3", "train/rollout k3", "{:.2e}"), ("extreme_frac", "extreme tokens", "{:.2e}"),
            ("route_agreement", "route agreement", "{:.4f}"),
            ("token_route_mismatch", "tokens rerouted", "{:.4f}"), ("clipfrac", "clip frac",
                                                                    "{:.4f}"),
            ("grad_spikes", "grad spikes", "{:.0f}"), ("collapsed", "collapses", "{:.0f}")]
    head = "| arm | " + " | ".join(c[1] for c in cols) + " |"
    lines = [head, "|" + "---|" * (len(cols) + 1)]
    for arm, stats in summary.items():
        cells = []
        for key, _, fmt in cols:
            s = stats[key]
            if "total" in s:
                cells.append(fmt.format(s["total"]))
            else:
                cells.append(f"{fmt.format(s['mean'])} ± {fmt.format(s['std'])}")
        lines.append(f"| {ARMS[arm][2]} | " + " | ".join(cells) + " |")
    lines.append("")
    lines.append(f"Mean ± sample std over seeds {seeds}; grad spikes (steps with a gradient norm "
                 f"above 5x the run's median) and collapses (final greedy accuracy below half "
                 f"the initial) are totals over seeds. k3, extreme tokens, routing and clipping "
                 f"are means over all steps.")
    return "\n".join(lines) + "\n"


def plot(out: Path, arms: list[str], seeds: list[int]) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, 4, figsize=(20, 8.5))
    for ax, (key, title) in zip(axes.flat, SERIES):
        for arm in arms:
            runs = [read_series(out / arm / f"seed{s}") for s in seeds]
            steps = sorted({r["step"] for run in runs for r in run if key in r})
            values = [[next((r[key] for r in run if r["step"] == st and key in r), math.nan)
                        for st in steps] for run in runs]
            mean = [statistics.fmean(col) for col in zip(*values)]
            ax.plot(steps, mean, label=ARMS[arm][2], marker="." if key.startswith("eval") else None)
            ax.fill_between(steps, [min(c) for c in zip(*values)], [max(c) for c in zip(*values)],
                            alpha=0.15)
        ax.set_title(title)
        ax.set_xlabel("RL step")
        if key in ("mismatch/k3", "grad_norm"):
            ax.set_yscale("log")
    axes.flat[-1].axis("off")
    handles, labels = axes.flat[0].get_legend_handles_labels()
    axes.flat[-1].legend(handles, labels, loc="center")
    fig.tight_layout()
    path = out / "curves.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def ensure_model(path: Path, variant: str, log) -> Path:
    if (path / "config.json").exists():
        return path
    log(f"warm-starting the {variant} model into {path} ...")
    subprocess.run([sys.executable, "-m", "moerl.warmstart", "--out", str(path), "--variant",
                    variant, "--max-operand", "30", "--target-accuracy", "0.4"], cwd=REPO,
                   check=True)
    return path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=REPO / "runs" / "compare")
    parser.add_argument("--quick", action="store_true",
                        help="tiny model, 2 seeds, 10 steps, 4 arms: under 10 minutes on CPU")
    parser.add_argument("--arms", nargs="+", choices=sorted(ARMS), default=None)
    parser.add_argument("--seeds", nargs="+", type=int, default=None)
    parser.add_argument("--steps", type=int, default=None)
    parser.add_argument("--eval-every", type=int, default=None)
    parser.add_argument("--model", type=Path, default=None,
                        help="HF checkpoint (default: warm-started tiny/wide model under --out)")
    parser.add_argument("--engine", choices=["builtin", "sglang"], default="builtin",
                        help="rollout engine: moerl's built-in server, or a real SGLang server "
                             "started by each run (all-MoE model variants)")
    args = parser.parse_args(argv)
    arms = args.arms or (QUICK_ARMS if args.quick else DEFAULT_ARMS)
    seeds = args.seeds or ([1, 2] if args.quick else [1, 2, 3])
    steps = args.steps or (10 if args.quick else 30)
    eval_every = args.eval_every or (5 if args.quick else 10)
    variant = ("tiny" if args.quick else "wide") + ("_moe" if args.engine == "sglang" else "")
    out = args.out
    out.mkdir(parents=True, exist_ok=True)

    def log(msg):
        print(f"[compare {time.strftime('%H:%M:%S')}] {msg}", flush=True)

    model = args.model or ensure_model(out / f"model_{variant}", variant, log)
    started = time.time()
    for seed in seeds:
        for arm in arms:
            run_one(arm, seed, out=out, model=model, steps=steps, eval_every=eval_every,
                    log=log, engine=args.engine)
    summary = summarize(out, arms, seeds)
    (out / "summary.json").write_text(json.dumps(
        {"arms": arms, "seeds": seeds, "steps": steps, "model": str(model), "variant": variant,
         "engine": args.engine, "settings": {**MISMATCH_SETTINGS,
                                             **engine_settings(args.engine, model)},
         "summary": summary}, indent=2))
    table = markdown(summary, seeds)
    (out / "summary.md").write_text(table)
    png = plot(out, arms, seeds)
    print(table)
    log(f"wrote {out / 'summary.md'}, {out / 'summary.json'}, {png} "
        f"({time.time() - started:.0f} s of training)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
