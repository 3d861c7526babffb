"""How the engine/trainer mismatch grows with the number of MoE layers a token crosses.

    python tools/route_depth.py --out runs/route_depth [--layers 1 2 4 8 12 24 48]
                                [--seeds 1 2 3] [--variants deep_moe deep_moe128]
                                [--model CKPT ...]

The R3 paper's argument (arXiv:2510.11370) is that routing flips compound with depth: on
Qwen3-30B-A3B about 10% of (token, layer) routing decisions differ between the inference engine
and the trainer, and 94% of tokens differ in at least one of its 48 MoE layers. This measures that
curve on CPU-sized models. For each shape in ``--variants`` (``moerl.tiny_model`` variants: the
comparison's ``deep_moe``, 64 experts, top-8, and ``deep_moe128``, 128 experts, top-16) and each
number of MoE layers L it builds random tiny Qwen3-MoEs of that shape with L layers (one per
``--seeds`` entry) and runs :func:`moerl.warmstart.route_fragility` on the ``chain`` task's
evaluation set: a bf16 forward of the same weights against the fp32 one, teacher-forced on
prompt + answer. Per L:

- ``rerouted``: the fraction of answer tokens whose experts differ in at least one layer;
- ``flip``: the fraction of (token, layer) decisions that differ, and ``1 - (1 - flip)^L``, what
  independent flips at that rate would give;
- ``kl``: the exact KL(fp32 || bf16) of the next-token distribution, over all answer tokens and
  split by tokens routed identically / differently.

``--model`` adds trained checkpoints (e.g. the comparison's warm start) as rows of their own: a
trained router's margins differ from a random one's. Writes ``route_depth.json``,
``route_depth.md`` and ``route_depth.png`` under ``--out``; a minute or two on a 2-core CPU.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

# Published reference point (R3 paper, Qwen3-30B-A3B: 48 MoE layers, 128 experts, top-8).
PAPER = {"layers": 48, "rerouted": 0.94, "flip": 0.10}
KEYS = ("rerouted", "flip", "independent", "kl", "kl_same", "kl_rerouted")


def measure(model_dir: Path, task, prompts) -> dict:
    """route_fragility of one checkpoint, with the per-decision flip rate and its prediction."""
    import torch
    from transformers import AutoModelForCausalLM

    from moerl.warmstart import route_fragility

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    layers = sum(1 for m in model.modules() if type(m).__name__.endswith("SparseMoeBlock"))
    got = route_fragility(model, task, prompts)
    flip = 1.0 - got["route_agreement"]
    return {"layers": layers, "tokens": got["tokens"], "rerouted": got["token_route_mismatch"],
            "flip": flip, "independent": 1.0 - (1.0 - flip) ** layers, "kl": got["kl"],
            "kl_same": got["kl_same"], "kl_rerouted": got["kl_rerouted"]}


def _spread(values: list[float]) -> tuple[float, float]:
    finite = [v for v in values if not math.isnan(v)]
    if not finite:
        return math.nan, math.nan
    return statistics.fmean(finite), statistics.stdev(finite) if len(finite) > 1 else 0.0


def sweep(layers: list[int], seeds: list[int], *, num_prompts: int, models: list[Path],
          variants: tuple[str, ...] = ("deep_moe",), log=print) -> dict:
    import torch
    from transformers.utils import logging as hf_logging

    from moerl.tasks.chain import ChainArithmeticTask
    from moerl.tiny_model import TINY_VARIANTS, create_tiny_hf_model

    torch.set_num_threads(1)
    hf_logging.disable_progress_bar()  # one save and one load per model: noise in the log
    task = ChainArithmeticTask(max_operand=9, num_terms=4, seed=7, eval_size=num_prompts)
    prompts = task.eval_set()
    rows = []
    with tempfile.TemporaryDirectory(prefix="moerl-route-depth-") as tmp:
        for variant in variants:
            for num_layers in layers:
                runs = []
                for seed in seeds:
                    path = create_tiny_hf_model(Path(tmp) / f"{variant}_L{num_layers}_s{seed}",
                                                seed=seed, **dict(TINY_VARIANTS[variant],
                                                                  num_hidden_layers=num_layers))
                    started = time.time()
                    runs.append(measure(path, task, prompts))
                    log(f"{variant} L={num_layers} seed {seed}: {runs[-1]['rerouted']:.3f} of "
                        f"tokens rerouted, kl {runs[-1]['kl']:.3g} "
                        f"({time.time() - started:.1f} s)")
                rows.append({"model": f"random {variant}", "layers": num_layers, "seeds": seeds,
                             **{k: _spread([r[k] for r in runs]) for k in KEYS}})
    for path in models:
        got = measure(path, task, prompts)
        log(f"{path}: {got['rerouted']:.3f} of tokens rerouted, kl {got['kl']:.3g}")
        rows.append({"model": str(path), "layers": got["layers"], "seeds": [],
                     **{k: (got[k], 0.0) for k in KEYS}})
    return {"task": "chain 4x9", "prompts": len(prompts), "engine": "bfloat16",
            "trainer": "float32", "paper": PAPER, "rows": rows}


def markdown(result: dict) -> str:
    lines = ["| model | MoE layers | tokens rerouted | per-decision flips | 1-(1-flip)^L | "
             "KL(fp32 \\|\\| bf16) | KL, same routing | KL, rerouted |",
             "|---|---|---|---|---|---|---|---|"]
    for r in result["rows"]:
        def cell(key, fmt):
            mean, std = r[key]
            if math.isnan(mean):
                return "-"
            return f"{mean:{fmt}} ± {std:{fmt}}" if r["seeds"] else f"{mean:{fmt}}"
        name = f"{r['model']} (seeds {r['seeds']})" if r["seeds"] else r["model"]
        lines.append(f"| {name} | {r['layers']} | {cell('rerouted', '.3f')} | "
                     f"{cell('flip', '.4f')} | {cell('independent', '.3f')} | "
                     f"{cell('kl', '.2e')} | {cell('kl_same', '.2e')} | "
                     f"{cell('kl_rerouted', '.2e')} |")
    p = result["paper"]
    lines += ["", f"bf16 forward vs fp32 forward of the same weights, teacher-forced on "
              f"{result['prompts']} {result['task']} evaluation problems (answer tokens only); "
              f"mean ± std over random initialisations. Published: Qwen3-30B-A3B, "
              f"{p['layers']} MoE layers, ~{p['flip']:.0%} of routing decisions and "
              f"~{p['rerouted']:.0%} of tokens differ between engine and trainer (R3 paper)."]
    return "\n".join(lines) + "\n"


def plot(result: dict, out: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    random_rows = [r for r in result["rows"] if r["seeds"]]
    trained = [r for r in result["rows"] if not r["seeds"]]
    by_shape: dict[str, list[dict]] = {}  # "random <variant>" -> its rows, in sweep order
    for r in random_rows:
        by_shape.setdefault(r["model"], []).append(r)
    xs = sorted({r["layers"] for r in random_rows})
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
    for shape, rows in by_shape.items():
        line = left.errorbar([r["layers"] for r in rows], [r["rerouted"][0] for r in rows],
                             yerr=[r["rerouted"][1] for r in rows], marker="o",
                             label=f"measured: {shape}, bf16 vs fp32")
        left.plot([r["layers"] for r in rows], [r["independent"][0] for r in rows], "--",
                  color=line.lines[0].get_color(), label=f"{shape}: 1-(1-flip)^L")
    for r in trained:
        left.plot([r["layers"]], [r["rerouted"][0]], "s", label=f"trained: {Path(r['model']).name}")
    p = result["paper"]
    left.plot([p["layers"]], [p["rerouted"]], "*", markersize=14, color="k",
              label="R3 paper: Qwen3-30B-A3B (SGLang vs Megatron)")
    left.set(xscale="log", xlabel="MoE layers", ylabel="tokens rerouted (>= 1 layer)",
             ylim=(0, 1.02), title="Routing flips compound with depth")
    left.set_xticks(xs, [str(x) for x in xs])
    left.legend(fontsize=7)
    for shape, rows in by_shape.items():
        for key, label in (("kl", "all tokens"), ("kl_same", "routed identically"),
                           ("kl_rerouted", "rerouted")):
            right.plot([r["layers"] for r in rows], [r[key][0] for r in rows], marker="o",
                       label=f"{shape}: {label}")
    for r in trained:
        right.plot([r["layers"]], [r["kl"][0]], "s",
                   label=f"trained: {Path(r['model']).name}, all tokens")
    right.set(xscale="log", yscale="log", xlabel="MoE layers",
              ylabel="KL(fp32 || bf16) per token", title="Mismatch KL vs depth")
    right.set_xticks(xs, [str(x) for x in xs])
    right.legend(fontsize=7)
    fig.tight_layout()
    path = out / "route_depth.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def main(argv: list[str] | None = None) -> int:
    from moerl.tiny_model import TINY_VARIANTS  # no torch import: only the table of shapes

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=REPO / "runs" / "route_depth")
    parser.add_argument("--layers", nargs="+", type=int, default=[1, 2, 4, 8, 12, 24, 48])
    parser.add_argument("--seeds", nargs="+", type=int, default=[1, 2, 3],
                        help="random initialisations per depth")
    parser.add_argument("--num-prompts", type=int, default=128,
                        help="chain problems (4 one-digit terms) to teacher-force")
    parser.add_argument("--variants", nargs="+", default=["deep_moe", "deep_moe128"],
                        choices=list(TINY_VARIANTS),
                        help="moerl.tiny_model variants whose shape (experts, top-k) the random "
                             "models take, each swept over --layers")
    parser.add_argument("--model", type=Path, nargs="*", default=[],
                        help="trained HF checkpoints to add as rows (e.g. a warm start)")
    args = parser.parse_args(argv)
    if any(n < 1 for n in args.layers):
        parser.error(f"--layers must be positive, got {args.layers}")
    if args.num_prompts < 1:
        parser.error(f"--num-prompts must be positive, got {args.num_prompts}")
    for path in args.model:
        if not (path / "config.json").exists():
            parser.error(f"--model {path}: no config.json there (an HF checkpoint directory)")
    args.out.mkdir(parents=True, exist_ok=True)
    result = sweep(args.layers, args.seeds, num_prompts=args.num_prompts, models=args.model,
                   variants=tuple(args.variants),
                   log=lambda msg: print(f"[route_depth] {msg}", flush=True))
    (args.out / "route_depth.json").write_text(json.dumps(result, indent=2))
    table = markdown(result)
    (args.out / "route_depth.md").write_text(table)
    figure = plot(result, args.out)
    print(table)
    print(f"[route_depth] wrote {args.out / 'route_depth.json'}, {args.out / 'route_depth.md'}, "
          f"{figure}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
