"""The comparison moerl exists for: GRPO with keep-routing vs GSPO without routing replay.

    python tools/compare.py --out runs/compare3 [--quick] [--seeds 1 2 3] [--arms ...]
                            [--engine builtin|sglang]
                            [--variant deep_moe128|deep_moe|deep_moe24]

Second edition: a setting fragile enough for the mechanism to show. The task is ``chain``
(multi-step arithmetic that writes every partial sum: responses of ~20-25 tokens, exact verifier;
``moerl.tasks.chain``), the model the ``deep_moe128`` tiny Qwen3-MoE (12 MoE layers, 128 experts,
top-16, all MoE so SGLang can serve it), on which a bf16 engine reroutes a majority of the warm
start's tokens in at least one layer (``--variant deep_moe``: 64 experts, top-8, about a third;
``deep_moe24``: that with 24 layers, about half), warm-started once per setting and cached under
``runs/warmstart/`` (reused by every arm and seed, and by later invocations). Every arm is a real
training run (torchrun, TP=2/EP=2, built-in rollout server) from that checkpoint with the same
seeds, under settings that make the train/rollout mismatch real: a bf16 rollout engine against an
fp32 trainer, top-p sampling, several mini-batch updates per rollout (off-policy).
``--engine sglang`` makes the rollout engine a real SGLang 0.5.23 server that each run starts
(``rollout.server=sglang``; ``launch/setup_sglang.sh`` first on a CPU machine): a second
implementation of the model, as at scale. SGLang serves only all-MoE Qwen3-MoE checkpoints (as
every variant is), and returns sampling masks only for a finite top-k, so top-k is set to the
vocabulary size (which truncates nothing: the arms sample with the same top-p as with the built-in
engine). Writes, under ``--out``:

    <arm>/seed<k>/metrics.jsonl      the telemetry series of each run (resumable run directories)
    summary.md                       per-arm table, paired differences with 95% intervals,
                                     collapses (pre-registered rule), the mechanism table
    summary.json                     the same numbers, machine-readable
    curves.png                       the series over steps, arms overlaid (mean, min-max band)
    mechanism.png                    |log ratio| distribution of rerouted vs identically routed
                                     tokens, k3 vs number of differing layers, clip/grad split

Resumable: a run with a ``done.json`` is not rerun; an interrupted run resumes from its last
checkpoint; ``--out`` keeps its setting in ``setting.json`` and refuses another one.
``--quick`` (3 arms x 2 seeds x 3 steps, a 50-step warm start) proves the whole pipeline, 7m14s
measured on an idle 2-core CPU (warm start included); the default is the full comparison
(``FULL``: its size and measured time are in the README). Statistics and the collapse rule:
``tools/compare_stats.py``.
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
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tools"))

from compare_stats import COLLAPSE_FRACTION, paired_difference, steps_to_collapse  # noqa: E402

# name -> (preset, extra flags, extra settings, description)
NO_REPLAY = ["--routing-replay", "none", "--no-keep-sampling-mask"]
ARMS = {
    "grpo_r3_mask": ("grpo", ["--keep-routing", "--keep-sampling-mask"], {},
                     "GRPO + keep routing (R3) + keep sampling mask"),
    "gspo": ("gspo", NO_REPLAY, {}, "GSPO, no routing replay"),
    "grpo": ("grpo", NO_REPLAY, {}, "GRPO, no replay (control)"),
    "gspo_r3": ("gspo", ["--keep-routing", "--no-keep-sampling-mask"], {}, "GSPO + keep routing"),
    "grpo_r3": ("grpo", ["--keep-routing", "--no-keep-sampling-mask"], {},
                "GRPO + keep routing (R3), no mask"),
    "grpo_r2": ("grpo", ["--routing-replay", "r2", "--no-keep-sampling-mask"], {},
                "GRPO + R2 (replay the trainer's own routes)"),
    # Attribution: the first arm changes two things at once; this one changes only the mask.
    "grpo_mask": ("grpo", ["--routing-replay", "none", "--keep-sampling-mask"], {},
                  "GRPO + keep sampling mask, no replay"),
    # The field's other answers to the mismatch: a closer engine dtype, importance corrections.
    "grpo_fp16": ("grpo", NO_REPLAY, {"rollout.engine_dtype": "float16"},
                  "GRPO, fp16 engine, no replay"),
    "grpo_tis": ("grpo_tis", NO_REPLAY, {}, "GRPO + TIS (token, C=2), no replay"),
    "grpo_icepop": ("grpo_icepop", NO_REPLAY, {}, "GRPO + IcePop [0.5, 5], no replay"),
    "grpo_seq_mis": ("grpo_seq_mis", NO_REPLAY, {}, "GRPO + sequence MIS (C=2), no replay"),
}
# The arms every paired difference is taken against, in order of preference.
BASELINES = ("grpo", "gspo")
# The question of the comparison: GRPO with keep-routing vs GSPO without replay.
HEADLINE_PAIR = ("grpo_r3_mask", "gspo")

# The setting: chain arithmetic on the fragile all-MoE model, bf16 engine vs fp32 trainer.
TASK = {"task.name": "chain", "task.num_terms": 4, "task.max_operand": 9, "task.eval_size": 128}
MISMATCH_SETTINGS = {
    "rollout.engine_dtype": "bfloat16",
    "rollout.top_p": 0.9,
    "rollout.max_new_tokens": 26,  # the longest chain of 4 one-digit terms is 22 tokens + eos
    "rollout.prompts_per_step": 8,
    "rollout.group_size": 8,
    "training.mini_batches": 4,  # 4 optimizer steps per rollout: 3 of them off-policy
}


@dataclass(frozen=True)
class Mode:
    """One size of the comparison."""

    arms: tuple[str, ...]
    seeds: tuple[int, ...]
    steps: int
    eval_every: int
    warm_steps: int  # warm-start step budget (stops earlier at warm_target)
    warm_target: float


# Sized for the ~90 minutes an idle 2-core CPU may spend: 3 x 3 x 50 = 450 rollout steps (1,800
# policy updates: 4 mini-batches per rollout). Measured with deep_moe128: 69 min for the 9 runs
# (8.5 s per RL step, 36 s of start-up per run) after a 3-minute warm start; deep_moe: 48 min.
# The paper's fourth arm (gspo_r3) and the others: --arms. 200 rollout steps per run: --steps
# 200 (~4x the time).
FULL = Mode(arms=("grpo_r3_mask", "gspo", "grpo"), seeds=(1, 2, 3), steps=50,
            eval_every=10, warm_steps=1500, warm_target=0.2)
# A short warm start: the quick mode proves the pipeline and measures step times and step-0
# routing; its policy is not yet right on whole chains, so its rewards carry little signal.
QUICK = Mode(arms=("grpo_r3_mask", "gspo", "grpo"), seeds=(1, 2), steps=3, eval_every=3,
             warm_steps=50, warm_target=0.2)
# moerl.tiny_model variants, the default first: 12 MoE layers of 128 experts (top-16), 12 / 24 of
# 64 experts (top-8).
VARIANTS = ("deep_moe128", "deep_moe", "deep_moe24")

SERIES = [("score/mean", "sample accuracy"), ("eval/accuracy", "greedy eval accuracy"),
          ("mismatch/k3", "train/rollout k3 KL"), ("mismatch/extreme_frac",
                                                    "extreme-token fraction"),
          ("routing/token_route_mismatch", "tokens routed differently (any layer)"),
          ("clipfrac", "clip fraction"), ("grad_norm", "grad norm"),
          ("mech/grad_share_rerouted", "share of gradient weight on rerouted tokens")]


def engine_settings(engine: str, model: Path) -> dict:
    """The rollout settings that select ``engine`` (see the module docstring)."""
    if engine == "builtin":
        return {}
    vocab = json.loads((model / "config.json").read_text())["vocab_size"]
    return {"rollout.server": "sglang", "rollout.top_k": vocab}


def run_one(arm: str, seed: int, *, out: Path, model: Path, mode: Mode, log,
            engine: str = "builtin") -> Path:
    run_dir = out / arm / f"seed{seed}"
    if (run_dir / "done.json").exists():
        log(f"{arm} seed {seed}: done, skipped")
        return run_dir
    preset, flags, extra, _ = ARMS[arm]
    settings = {**TASK, **MISMATCH_SETTINGS, **extra, **engine_settings(engine, model),
                "model.hf_path": model,
                "training.out_dir": run_dir, "training.steps": mode.steps,
                "training.eval_every": mode.eval_every, "training.checkpoint_every": 5,
                "training.resume": "true", "rollout.seed": 1000 + seed, "training.seed": seed,
                "logging.progress": "false"}
    args = [f"configs/{preset}.yaml", *flags]
    for key, value in settings.items():
        args += ["--set", f"{key}={value}"]
    run_dir.mkdir(parents=True, exist_ok=True)
    started = time.time()
    log(f"{arm} seed {seed}: training {mode.steps} steps ...")
    with open(run_dir / "train.log", "a") as fh:
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


def _num(value) -> float:
    """A metric value as a float (telemetry writes non-finite values as strings)."""
    return float(value) if isinstance(value, (int, float, str)) else math.nan


def run_stats(records: list[dict]) -> dict[str, float]:
    """One run's summary numbers."""
    train = [r for r in records if "score/mean" in r]
    evals = [r["eval/accuracy"] for r in records if "eval/accuracy" in r]
    last = train[-max(1, len(train) // 10):]  # the last tenth of the run
    grad = [g for g in (_num(r["grad_norm"]) for r in train) if math.isfinite(g)]
    # Steps whose groups all got equal rewards carry no gradient (norm 0); a spike is judged
    # against the steps that had one (a run that stopped learning has a median of 0, against
    # which every step with a gradient would count).
    live = [g for g in grad if g > 0]
    median = statistics.median(live) if live else float("nan")

    def mean(key, rows=train):
        values = [_num(r[key]) for r in rows if key in r]
        values = [v for v in values if math.isfinite(v)]
        return statistics.fmean(values) if values else float("nan")

    collapse = steps_to_collapse(records)
    return {
        "initial_accuracy": evals[0] if evals else float("nan"),
        "final_accuracy": evals[-1] if evals else float("nan"),
        "reward_last": mean("score/mean", last),
        "k3": mean("mismatch/k3"),
        "abs_logp_diff": mean("mismatch/abs_mean"),
        "extreme_frac": mean("mismatch/extreme_frac"),
        "route_agreement": mean("routing/route_agreement"),
        "token_route_mismatch": mean("routing/token_route_mismatch"),
        "token_route_mismatch_step0": mean("routing/token_route_mismatch", train[:1]),
        "clipfrac": mean("clipfrac"),
        "grad_share_rerouted": mean("mech/grad_share_rerouted"),
        "clipfrac_same": mean("mech/clipfrac_same"),
        "clipfrac_rerouted": mean("mech/clipfrac_rerouted"),
        "seconds_per_step": mean("time/step"),
        # A spike: a step whose gradient norm exceeds 5x the run's median (steps with one).
        "grad_spikes": float(sum(g > 5 * median for g in live)),
        "collapsed": float(collapse is not None),
        "steps_to_collapse": float(collapse) if collapse is not None else float("nan"),
        "skipped_steps": sum(_num(r.get("skipped", 0)) for r in train),
    }


_TOTALS = ("grad_spikes", "collapsed", "skipped_steps")


def summarize(out: Path, arms: list[str], seeds: list[int]) -> dict:
    summary = {}
    for arm in arms:
        per_seed = [run_stats(read_series(out / arm / f"seed{s}")) for s in seeds]
        summary[arm] = {}
        for key in per_seed[0]:
            values = [p[key] for p in per_seed]
            if key in _TOTALS:
                summary[arm][key] = {"total": sum(values), "per_seed": values}
            else:
                finite = [v for v in values if math.isfinite(v)]
                summary[arm][key] = {
                    "mean": statistics.fmean(finite) if finite else float("nan"),
                    "std": statistics.stdev(finite) if len(finite) > 1 else 0.0,
                    "per_seed": values}
    return summary


PAIRED_METRICS = (("final_accuracy", "final greedy accuracy"), ("reward_last", "reward (last "
                                                                               "tenth)"),
                  ("k3", "train/rollout k3"))


def paired(summary: dict, arms: list[str]) -> list[dict]:
    """Paired differences: the headline pair, then every arm against the first baseline."""
    pairs = []
    if all(a in arms for a in HEADLINE_PAIR):
        pairs.append(HEADLINE_PAIR)
    base = next((b for b in BASELINES if b in arms), None)
    pairs += [(arm, base) for arm in arms if base and arm != base and (arm, base) not in pairs]
    rows = []
    for a, b in pairs:
        for key, label in PAIRED_METRICS:
            rows.append({"a": a, "b": b, "metric": key, "label": label, **paired_difference(
                summary[a][key]["per_seed"], summary[b][key]["per_seed"])})
    return rows


def mechanism(out: Path, arms: list[str], seeds: list[int]) -> dict:
    """:func:`mechanism_of` each arm, over all its steps and seeds."""
    return {arm: mechanism_of([r for s in seeds for r in read_series(out / arm / f"seed{s}")])
            for arm in arms}


def mechanism_of(records: list[dict]) -> dict:
    """moerl.mechanism's per-step metrics pooled over ``records``: the |log ratio| histograms
    (token counts per bin) of identically routed and rerouted tokens, their token-weighted mean
    |log ratio|, and per number of differing MoE layers the tokens and their token-weighted k3."""
    from moerl.mechanism import GROUPS, NUM_BINS

    records = [r for r in records if "mech/tokens_same" in r]

    def total(key):
        return sum(_num(r.get(key, 0)) for r in records)

    def weighted_mean(key, weight_key):
        pairs = [(_num(r[weight_key]), _num(r[key])) for r in records if key in r]
        pairs = [(w, v) for w, v in pairs if w and math.isfinite(v)]
        weight = sum(w for w, _ in pairs)
        return sum(w * v for w, v in pairs) / weight if weight else math.nan

    layers = sorted(int(k.removeprefix("mech/tokens_dlayers")) for k in
                    (records[0] if records else {}) if k.startswith("mech/tokens_dlayers"))
    return {
        "hist": {g: [total(f"mech/hist_{g}_b{i}") for i in range(NUM_BINS)] for g in GROUPS},
        "abs_logratio": {g: weighted_mean(f"mech/abs_logratio_{g}", f"mech/tokens_{g}")
                         for g in GROUPS},
        "tokens_by_dlayers": {d: total(f"mech/tokens_dlayers{d}") for d in layers},
        "k3_by_dlayers": {d: weighted_mean(f"mech/k3_dlayers{d}", f"mech/tokens_dlayers{d}")
                          for d in layers},
    }


def _cell(stats: dict, fmt: str) -> str:
    if "total" in stats:
        return fmt.format(stats["total"])
    return f"{fmt.format(stats['mean'])} ± {fmt.format(stats['std'])}"


def markdown(summary: dict, seeds: list[int], pairs: list[dict], mech: dict) -> str:
    cols = [("final_accuracy", "final eval acc", "{:.3f}"),
            ("reward_last", "reward (last tenth)", "{:.3f}"),
            ("k3", "train/rollout k3", "{:.2e}"), ("extreme_frac", "extreme tokens", "{:.2e}"),
            ("token_route_mismatch_step0", "rerouted @0", "{:.3f}"),
            ("token_route_mismatch", "rerouted", "{:.3f}"), ("clipfrac", "clip frac", "{:.4f}"),
            ("grad_spikes", "grad spikes", "{:.0f}"), ("collapsed", "collapses", "{:.0f}")]
    lines = ["| arm | " + " | ".join(c[1] for c in cols) + " |", "|" + "---|" * (len(cols) + 1)]
    for arm, stats in summary.items():
        lines.append(f"| {ARMS[arm][3]} | " + " | ".join(_cell(stats[k], f) for k, _, f in cols)
                     + " |")
    lines += ["", f"Mean ± sample std over seeds {seeds}; grad spikes (steps with a gradient norm "
              f"above 5x the run's median over steps with a nonzero gradient) and collapses are "
              f"totals over seeds. A run collapses "
              f"(pre-registered, tools/compare_stats.py) when its greedy accuracy stays below "
              f"{COLLAPSE_FRACTION:g}x its step-0 value from some evaluation to the end, or its "
              f"gradient norm stays non-finite. k3, extreme tokens, routing and clipping are "
              f"means over all steps; 'rerouted @0' is step 0 (the bf16 engine vs the fp32 "
              f"trainer on the warm start).", ""]
    collapses = [f"{ARMS[arm][3]}: seed {s} at step {int(v)}" for arm, stats in summary.items()
                 for s, v in zip(seeds, stats["steps_to_collapse"]["per_seed"])
                 if math.isfinite(v)]
    lines += [f"Steps to collapse: {'; '.join(collapses) if collapses else 'no run collapsed'}.",
              ""]
    if pairs:
        lines += ["| A | B | metric | mean(A - B) | 95% paired-t | 95% bootstrap | n |",
                  "|---|---|---|---|---|---|---|"]
        for p in pairs:
            star = " *" if p["significant"] else ""
            lines.append(f"| {p['a']} | {p['b']} | {p['label']} | {p['mean']:+.4g}{star} | "
                         f"[{p['t_low']:+.3g}, {p['t_high']:+.3g}] | [{p['boot_low']:+.3g}, "
                         f"{p['boot_high']:+.3g}] | {int(p['n'])} |")
        lines += ["", "Differences are per seed (same seeds in both arms), then averaged; * marks "
                  "a t interval that excludes 0.", ""]
    lines += ["| arm | mean abs log ratio, same routing | rerouted | clip frac, same | rerouted "
              "| grad share on rerouted | tokens rerouted |", "|---|---|---|---|---|---|---|"]
    for arm, stats in summary.items():
        m = mech.get(arm, {}).get("abs_logratio", {})
        lines.append(f"| {ARMS[arm][3]} | {m.get('same', math.nan):.3e} | "
                     f"{m.get('rerouted', math.nan):.3e} | "
                     + " | ".join(_cell(stats[k], "{:.4f}") for k in (
                         "clipfrac_same", "clipfrac_rerouted", "grad_share_rerouted",
                         "token_route_mismatch")) + " |")
    lines += ["", "Mechanism (moerl.mechanism): |old_logprobs - rollout_logprobs| of tokens whose "
              "top-k experts are identical in every MoE layer vs differ in at least one (the "
              "trainer's natural routing against the engine's, also under replay), token-"
              "weighted over all steps and seeds; clip fractions are over tokens with a nonzero "
              "advantage whose policy-gradient weight is exactly zero; the gradient share is the "
              "fraction of sum |dL/dlogp| on rerouted tokens."]
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
            values = [[next((_num(r[key]) for r in run if r["step"] == st and key in r), math.nan)
                        for st in steps] for run in runs]
            mean = [statistics.fmean(col) for col in zip(*values)]
            ax.plot(steps, mean, label=ARMS[arm][3], marker="." if key.startswith("eval") else None)
            ax.fill_between(steps, [min(c) for c in zip(*values)], [max(c) for c in zip(*values)],
                            alpha=0.15)
        ax.set_title(title)
        ax.set_xlabel("RL step")
        if key in ("mismatch/k3", "grad_norm"):
            ax.set_yscale("log")
    handles, labels = axes.flat[0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=min(4, len(labels)))
    fig.tight_layout(rect=(0, 0.07, 1, 1))
    path = out / "curves.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


# A depth (number of MoE layers whose experts differ) enters the k3-vs-depth panel only with at
# least this many tokens over all steps and seeds: the few dozen tokens rerouted in 6+ layers
# gave k3 values that swung over ten orders of magnitude and flattened the panel.
MIN_DEPTH_TOKENS = 100


def plotted_depths(entry: dict) -> list:
    """The depths of a mechanism entry (``mechanism_of``; int keys, or str once read back from
    JSON) with at least ``MIN_DEPTH_TOKENS`` tokens, in increasing order."""
    return sorted((d for d, n in entry["tokens_by_dlayers"].items() if n >= MIN_DEPTH_TOKENS),
                  key=int)


def plot_mechanism(out: Path, mech: dict, summary: dict) -> Path:
    """The ratio-distribution split, k3 vs differing layers, and the clip split, per arm."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from moerl.mechanism import LOGRATIO_EDGES

    fig, axes = plt.subplots(1, 3, figsize=(19, 5))
    labels = [f"<={e:g}" for e in LOGRATIO_EDGES] + [f">{LOGRATIO_EDGES[-1]:g}"]
    for i, (arm, entry) in enumerate(mech.items()):
        for group, style in (("same", "--"), ("rerouted", "-")):
            counts = entry["hist"].get(group) or []
            total = sum(counts)
            if total:
                axes[0].plot(range(len(counts)), [c / total for c in counts], style,
                             color=f"C{i}", label=f"{ARMS[arm][3]}: {group}")
        layers = plotted_depths(entry)
        axes[1].plot([int(d) for d in layers], [entry["k3_by_dlayers"][d] for d in layers], "o-",
                     color=f"C{i}", label=ARMS[arm][3])
    axes[0].set_xticks(range(len(labels)), labels, rotation=45)
    axes[0].set_title("|log pi_old - log pi_engine|: identically routed (--) vs rerouted (-)")
    axes[0].set_ylabel("fraction of the group's tokens")
    axes[1].set_yscale("log")
    axes[1].set_title(f"k3 KL vs number of MoE layers whose experts differ "
                      f"(depths with >= {MIN_DEPTH_TOKENS} tokens)", fontsize=10)
    axes[1].set_xlabel("MoE layers with different top-k experts")
    names = list(summary)
    width = 0.4
    for j, group in enumerate(("same", "rerouted")):
        axes[2].bar([k + (j - 0.5) * width for k in range(len(names))],
                    [summary[a][f"clipfrac_{group}"]["mean"] for a in names], width,
                    label=f"clip fraction, {group} routing")
    axes[2].set_xticks(range(len(names)), names, rotation=30)
    axes[2].set_title("clip fraction by routing")
    axes[2].legend(fontsize=8)
    axes[0].legend(fontsize=7)
    axes[1].legend(fontsize=7)
    fig.tight_layout()
    path = out / "mechanism.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def warm_start_path(mode: Mode, variant: str) -> Path:
    """Where the warm start of ``variant`` under ``mode``'s budget is cached: one per setting."""
    key = (f"{variant}_{TASK['task.name']}{TASK['task.num_terms']}x{TASK['task.max_operand']}"
           f"_s{mode.warm_steps}_t{mode.warm_target:g}")
    return REPO / "runs" / "warmstart" / key


def ensure_model(mode: Mode, log, variant: str = VARIANTS[0]) -> Path:
    """The warm-started checkpoint of this setting, made once and cached under runs/warmstart/."""
    path = warm_start_path(mode, variant)
    if (path / "config.json").exists():
        return path
    log(f"warm-starting the {variant} model on {TASK['task.name']} into {path} ...")
    subprocess.run([sys.executable, "-m", "moerl.warmstart", "--out", str(path), "--variant",
                    variant, "--task", TASK["task.name"], "--num-terms",
                    str(TASK["task.num_terms"]), "--max-operand", str(TASK["task.max_operand"]),
                    "--max-steps", str(mode.warm_steps), "--target-accuracy",
                    str(mode.warm_target)], cwd=REPO, check=True,
                   env={**os.environ, "OMP_NUM_THREADS": "1"})
    return path


def check_setting(out: Path, setting: dict) -> None:
    """Refuse to run into an ``--out`` that holds runs of another setting (model, engine, steps,
    ...): a finished run there would be skipped and counted as this setting's, and an unfinished
    one resumed from the other setting's checkpoint. The first invocation records the setting in
    ``setting.json``; arms and seeds may be added later, the rest must match."""
    setting = json.loads(json.dumps(setting, default=str))  # as it reads back from disk
    path = out / "setting.json"
    if not path.exists():
        path.write_text(json.dumps(setting, indent=2, sort_keys=True))
        return
    before = json.loads(path.read_text())
    changed = sorted(k for k in before.keys() | setting.keys() if before.get(k) != setting.get(k))
    if changed:
        diff = "; ".join(f"{k}: {before.get(k)!r} there, {setting.get(k)!r} now" for k in changed)
        raise SystemExit(f"--out {out} holds runs of another setting ({diff}). Pass a new --out, "
                         f"or the flags of that setting to resume it.")


def estimate_minutes(summary: dict, mode: Mode, *, startup_s: float) -> float:
    """Minutes a mode would take at the measured seconds per step (mean over arms) plus a
    per-run start-up cost (torchrun, model build, server start, final evaluation)."""
    per_step = statistics.fmean(s["seconds_per_step"]["mean"] for s in summary.values())
    runs = len(mode.arms) * len(mode.seeds)
    return (runs * (mode.steps * per_step + startup_s)) / 60


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=None,
                        help="run directory (default: runs/compare, --quick: runs/compare_quick); "
                             "resumable, and refused if it holds runs of another setting")
    parser.add_argument("--quick", action="store_true",
                        help="3 arms x 2 seeds x 3 steps, 50-step warm start: the pipeline end "
                             "to end, 7m14s measured on an idle 2-core CPU")
    parser.add_argument("--arms", nargs="+", choices=sorted(ARMS), default=None,
                        help=f"default: {' '.join(FULL.arms)} (--quick: {' '.join(QUICK.arms)})")
    parser.add_argument("--seeds", nargs="+", type=int, default=None)
    parser.add_argument("--steps", type=int, default=None)
    parser.add_argument("--eval-every", type=int, default=None)
    parser.add_argument("--variant", choices=VARIANTS, default=VARIANTS[0],
                        help="the model: deep_moe128 (12 MoE layers of 128 experts, top-16: a "
                             "majority of the warm start's tokens rerouted by a bf16 engine), "
                             "deep_moe (12 layers of 64 experts, top-8: about a third) or "
                             "deep_moe24 (24 such layers: about half, ~2x the time per step); "
                             "each has its own cached warm start")
    parser.add_argument("--model", type=Path, default=None,
                        help="HF checkpoint (default: the cached warm start of --variant)")
    parser.add_argument("--engine", choices=["builtin", "sglang"], default="builtin",
                        help="rollout engine: moerl's built-in server, or a real SGLang server "
                             "started by each run (the model must be all-MoE, as every "
                             "variant is)")
    args = parser.parse_args(argv)
    base = QUICK if args.quick else FULL
    mode = Mode(arms=tuple(args.arms or base.arms), seeds=tuple(args.seeds or base.seeds),
                steps=args.steps or base.steps, eval_every=args.eval_every or base.eval_every,
                warm_steps=base.warm_steps, warm_target=base.warm_target)
    out = args.out or REPO / "runs" / ("compare_quick" if args.quick else "compare")
    out.mkdir(parents=True, exist_ok=True)

    def log(msg):
        print(f"[compare {time.strftime('%H:%M:%S')}] {msg}", flush=True)

    model = args.model or ensure_model(mode, log, args.variant)
    settings = {**MISMATCH_SETTINGS, **engine_settings(args.engine, model)}
    check_setting(out, {"model": str(model), "engine": args.engine, "steps": mode.steps,
                        "eval_every": mode.eval_every, "task": TASK, "settings": settings})
    started = time.time()
    for seed in mode.seeds:
        for arm in mode.arms:
            run_one(arm, seed, out=out, model=model, mode=mode, log=log, engine=args.engine)
    arms, seeds = list(mode.arms), list(mode.seeds)
    summary = summarize(out, arms, seeds)
    pairs = paired(summary, arms)
    mech = mechanism(out, arms, seeds)
    warm = model / "warmstart.json"
    (out / "summary.json").write_text(json.dumps(
        {"arms": arms, "seeds": seeds, "steps": mode.steps, "model": str(model),
         "variant": None if args.model else args.variant, "task": TASK, "engine": args.engine,
         "settings": settings,
         "warmstart": json.loads(warm.read_text()) if warm.exists() else None,
         "summary": summary, "paired": pairs, "mechanism": mech}, indent=2))
    table = markdown(summary, seeds, pairs, mech)
    (out / "summary.md").write_text(table)
    figures = [plot(out, arms, seeds), plot_mechanism(out, mech, summary)]
    print(table)
    runs = [json.loads((out / a / f"seed{s}" / "done.json").read_text())["seconds"]
            for a in arms for s in seeds]
    per_step = statistics.fmean(s["seconds_per_step"]["mean"] for s in summary.values())
    startup = max(0.0, statistics.fmean(runs) - mode.steps * per_step)
    log(f"measured {per_step:.1f} s per RL step, {startup:.0f} s of per-run overhead; the full "
        f"mode ({len(FULL.arms)} arms x {len(FULL.seeds)} seeds x {FULL.steps} steps) would "
        f"take ~{estimate_minutes(summary, FULL, startup_s=startup):.0f} min on this machine now")
    log(f"wrote {out / 'summary.md'}, {out / 'summary.json'}, "
        f"{', '.join(map(str, figures))} ({time.time() - started:.0f} s of training)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
