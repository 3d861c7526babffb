"""``python -m moerl.launch_info CONFIG [--set ...] [flags]``: what launch/local.sh needs to know,
after every check that can be made before a process starts.

Prints ``<processes> <model.hf_path> <task.max_operand>``: the processes to start on this machine,
``$NPROC_PER_NODE`` or ``$NPROC`` when set, else the smallest world the parallel layout fits,
lcm(tp, ep * etp). The world is that times ``$NNODES`` (launch/multinode.sh). Exits 2, with every
problem found, when:

- the installed megatron-core is not a release moerl supports;
- the command line has an unknown flag, or the config an unknown key or a bad value (the same
  parser and validation as ``moerl.train``);
- the model's ``config.json`` (``model.hf_path``; ``ref_path`` and ``critic_path`` when set)
  cannot be split by the parallel layout, or ``rollout.max_new_tokens`` leaves no room for a
  prompt within its ``max_position_embeddings``;
- the world does not fit the layout, or needs more processes than this machine has devices
  (GPUs, or CPU cores without one);
- ``training.out_dir`` holds a checkpoint that a resume would load with a different layout, or
  is in use by a running run (its lock, see moerl.run_guard).

The model checks are skipped while ``model.hf_path`` has no ``config.json`` yet (launch/local.sh
runs the tiny warm start, then asks again).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
from pathlib import Path

from moerl.config import Config, ConfigError, add_cli_arguments, config_from_args
from moerl.run_guard import is_locked
from moerl.trainer.megatron_version import UnsupportedMegatronError, check_megatron_version


def processes_here(cfg: Config) -> int:
    p = cfg.parallel
    return int(os.environ.get("NPROC_PER_NODE") or os.environ.get("NPROC")
               or math.lcm(p.tp, p.ep * p.etp))


def world_size(cfg: Config) -> int:
    return int(os.environ.get("NNODES") or 1) * processes_here(cfg)


def model_problems(cfg: Config) -> list[str]:
    """What the model checkpoints' config.json say against the config (empty when fine)."""
    from moerl.trainer.model import architecture_from_hf, validate_architecture_layout

    problems = []
    for key in ("ref_path", "critic_path"):
        path = getattr(cfg.model, key)
        if path and not (Path(path) / "config.json").is_file():
            problems.append(f"model.{key}={path} has no config.json")
    hf_config = json.loads((Path(cfg.model.hf_path) / "config.json").read_text())
    try:
        arch = architecture_from_hf(hf_config)
    except (ValueError, KeyError) as err:
        return problems + [f"{cfg.model.hf_path}/config.json: {err}"]
    try:
        p = cfg.parallel
        validate_architecture_layout(arch, tp=p.tp, ep=p.ep, etp=p.etp)
    except ValueError as err:
        problems.append(str(err))
    if cfg.rollout.max_new_tokens >= arch.max_position_embeddings:
        problems.append(f"rollout.max_new_tokens={cfg.rollout.max_new_tokens} leaves no room for "
                        f"a prompt in the model's context of max_position_embeddings="
                        f"{arch.max_position_embeddings} tokens")
    return problems


def world_problems(cfg: Config, world: int, here: int) -> list[str]:
    p = cfg.parallel
    problems = []
    if world % p.tp or world % (p.ep * p.etp):
        problems.append(f"{world} processes do not fit parallel.tp={p.tp}, ep={p.ep}, etp={p.etp}:"
                        f" use a multiple of {math.lcm(p.tp, p.ep * p.etp)} (NPROC)")
    devices, kind = _devices()
    if here > devices:
        problems.append(f"the layout needs {here} processes here but this machine has {devices} "
                        f"{kind}: lower parallel.tp/ep/etp, or launch across machines "
                        f"(launch/multinode.sh, launch/slurm.sbatch)")
    return problems


def _devices() -> tuple[int, str]:
    import torch

    if torch.cuda.is_available():
        return torch.cuda.device_count(), "GPUs"
    return os.cpu_count() or 1, "CPU cores"


def checkpoint_problems(cfg: Config, world: int) -> list[str]:
    """A resume would load the newest checkpoint: its recorded layout must be this run's."""
    if not cfg.training.resume:
        return []
    root = Path(cfg.training.out_dir) / "checkpoints"
    steps = sorted((p for p in root.glob("step_*") if p.name.removeprefix("step_").isdigit()),
                   reverse=True)
    for path in steps:
        try:
            saved = json.loads((path / "meta.json").read_text())["layout"]
        except (OSError, ValueError, KeyError, TypeError):
            continue  # damaged: the trainer skips it with a warning and tries the next one
        p = cfg.parallel
        wanted = {"world": world, "tp": p.tp, "ep": p.ep, "etp": p.etp}
        if saved != wanted:
            return [f"{path} was written with layout {saved}, this launch is {wanted}: resume "
                    f"with the same layout, or set training.out_dir for a new run"]
        return []
    return []


def preflight(cfg: Config) -> list[str]:
    world = world_size(cfg)
    problems = world_problems(cfg, world, processes_here(cfg)) + checkpoint_problems(cfg, world)
    holder = is_locked(cfg.training.out_dir)
    if holder:
        problems.append(holder)
    if (Path(cfg.model.hf_path) / "config.json").is_file():
        problems += model_problems(cfg)
    return problems


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="moerl.launch_info")
    add_cli_arguments(parser)
    args = parser.parse_args(argv)  # an unknown flag exits 2 here, before any process starts
    try:
        cfg = config_from_args(args)
        check_megatron_version()
    except (ConfigError, UnsupportedMegatronError) as err:
        print(f"moerl: {err}", file=sys.stderr)
        return 2
    problems = preflight(cfg)
    if problems:
        print("moerl: this launch cannot work:\n  - " + "\n  - ".join(problems), file=sys.stderr)
        return 2
    print(processes_here(cfg), cfg.model.hf_path, cfg.task.max_operand)
    return 0


if __name__ == "__main__":
    sys.exit(main())
