"""The ``moerl`` command.

    moerl train CONFIG.yaml [...] [--set a.b=c] [flags] [--nproc N]   RL / DPO training (torchrun)
    moerl serve --model DIR --port N [...]                             the built-in rollout server
    moerl compare [--quick] [--out DIR]                                 GRPO+R3 vs GSPO report
    moerl plan CONFIG.yaml [...] --hf-config FILE --world N             memory and payload plan
    moerl export RUN_DIR --step N --out DIR                             HF weights of a saved step
    moerl plot RUN_DIR [--metrics a,b] [--out PNG]                      figure of a run's metrics

``train`` validates the config first (a mistake exits 2 before any process starts), then runs
``torchrun --standalone`` with as many processes as the parallel layout needs (lcm(tp, ep*etp);
``--nproc`` overrides). ``export`` runs torchrun with the checkpoint's own world size.
``compare`` and ``plan`` run the repository's ``tools/`` scripts, so they need a source checkout
(an editable install).
"""

from __future__ import annotations

import argparse
import math
import os
import runpy
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def _torchrun(nproc: int, module: str, args: list[str]) -> int:
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone",
           f"--nproc_per_node={nproc}", "-m", module, *args]
    return subprocess.call(cmd, env=env)


def train(argv: list[str]) -> int:
    from moerl.config import ConfigError, add_cli_arguments, config_from_args

    parser = argparse.ArgumentParser(prog="moerl train", add_help=False)
    parser.add_argument("--nproc", type=int, default=0)
    known, rest = parser.parse_known_args(argv)
    if "--options" in rest or "-h" in rest or "--help" in rest:
        from moerl.train import main as train_main

        return train_main(rest)
    check = argparse.ArgumentParser(prog="moerl train")
    add_cli_arguments(check)
    try:
        cfg = config_from_args(check.parse_args(rest))
    except ConfigError as err:
        print(f"moerl: {err}", file=sys.stderr)
        return 2
    p = cfg.parallel
    return _torchrun(known.nproc or math.lcm(p.tp, p.ep * p.etp), "moerl.train", rest)


def export(argv: list[str]) -> int:
    from moerl.config import ConfigError
    from moerl.export import checkpoint_meta

    parser = argparse.ArgumentParser(prog="moerl export",
                                     description="write the HF checkpoint of a saved step")
    parser.add_argument("run_dir", type=Path, help="the run's training.out_dir")
    parser.add_argument("--step", type=int, required=True, help="a saved step")
    parser.add_argument("--out", type=Path, required=True, help="output directory")
    args = parser.parse_args(argv)
    try:
        meta = checkpoint_meta(args.run_dir, args.step)
    except ConfigError as err:
        print(f"moerl: {err}", file=sys.stderr)
        return 2
    return _torchrun(meta["layout"]["world"], "moerl.export", argv)


def plot(argv: list[str]) -> int:
    from moerl.plot import DEFAULT_METRICS, plot_run

    parser = argparse.ArgumentParser(prog="moerl plot", description="plot a run's metrics")
    parser.add_argument("run_dir", type=Path, help="the run's training.out_dir")
    parser.add_argument("--metrics", default=",".join(DEFAULT_METRICS),
                        help="comma-separated metric names (prefix* matches by prefix)")
    parser.add_argument("--out", type=Path, default=None, help="PNG path (RUN_DIR/metrics.png)")
    args = parser.parse_args(argv)
    try:
        out = plot_run(args.run_dir, metrics=tuple(args.metrics.split(",")), out=args.out)
    except ValueError as err:
        print(f"moerl: {err}", file=sys.stderr)
        return 2
    print(out)
    return 0


def serve(argv: list[str]) -> int:
    from moerl.rollout.server import main as serve_main

    serve_main(argv)
    return 0


def _tool(name: str):
    def run(argv: list[str]) -> int:
        script = REPO / "tools" / f"{name}.py"
        if not script.is_file():
            print(f"moerl {name} runs {script}, which this installation lacks: use a source "
                  f"checkout (pip install -e .)", file=sys.stderr)
            return 2
        sys.argv = [str(script), *argv]
        try:
            runpy.run_path(str(script), run_name="__main__")
        except SystemExit as done:
            return done.code if isinstance(done.code, int) else (done.code is not None)
        return 0
    return run


COMMANDS = {"train": train, "serve": serve, "compare": _tool("compare"), "plan": _tool("plan"),
            "export": export, "plot": plot}


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] not in COMMANDS:
        print(__doc__.split("\n\n")[1], file=sys.stderr)
        if argv and argv[0] not in ("-h", "--help"):
            print(f"moerl: unknown command {argv[0]!r}; choose one of {list(COMMANDS)}",
                  file=sys.stderr)
            return 2
        return 0 if argv else 2
    return COMMANDS[argv[0]](argv[1:])


if __name__ == "__main__":
    sys.exit(main())
