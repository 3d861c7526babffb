"""``moerl export RUN_DIR --step N --out DIR``: the Hugging Face checkpoint of a saved step.

Runs under torchrun with the world size the checkpoint was written with (``moerl export`` starts
it): every rank rebuilds the actor from the run's resolved ``config.yaml``, loads its shard of
``checkpoints/step_N``, and the shards are gathered into ``DIR`` (safetensors, the model's
config and tokenizer files), the same writer as the trained policy's ``out_dir/hf``.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from moerl.config import ConfigError, load_config


def checkpoint_meta(run_dir: Path, step: int) -> dict:
    """The saved step's ``meta.json``, or a ConfigError listing the steps there are."""
    root = run_dir / "checkpoints"
    meta = root / f"step_{step:06d}" / "meta.json"
    if not meta.is_file():
        steps = sorted(int(p.parent.name.removeprefix("step_"))
                       for p in root.glob("step_*/meta.json"))
        raise ConfigError(f"{run_dir} has no checkpoint of step {step}; saved steps: {steps} "
                          f"(training.checkpoint_every sets which steps are saved; the last 2 "
                          f"are kept)")
    return json.loads(meta.read_text())


def export_step(run_dir: Path, step: int, out: Path) -> None:
    """Under torchrun: load step ``step`` of ``run_dir`` and write it as an HF checkpoint."""
    from moerl.checkpoint import CheckpointManager
    from moerl.trainer.actor import Actor
    from moerl.trainer.model import architecture_from_hf
    from moerl.trainer.parallel import destroy_parallel, init_parallel

    cfg = load_config([run_dir / "config.yaml"])
    meta = checkpoint_meta(run_dir, step)
    hf_path = Path(cfg.model.hf_path)
    arch = architecture_from_hf(json.loads((hf_path / "config.json").read_text()))
    saved = meta["layout"]
    layout, groups = init_parallel(tp=saved["tp"], ep=saved["ep"], etp=saved["etp"],
                                   seed=cfg.training.seed, timeout_s=600.0)
    try:
        bf16, fp16 = cfg.model.dtype == "bfloat16", cfg.model.dtype == "float16"
        tr = cfg.training
        # The optimizer must match the saved one's structure for its state to load.
        optim = dict(lr=tr.lr, weight_decay=tr.weight_decay, adam_beta1=tr.adam_beta1,
                     adam_beta2=tr.adam_beta2, clip_grad=tr.grad_clip,
                     warmup_steps=tr.warmup_steps,
                     use_distributed_optimizer=cfg.parallel.distributed_optimizer, bf16=bf16,
                     fp16=fp16)
        actor = Actor(arch=arch, layout=layout, groups=groups, hf_path=str(hf_path),
                      ref_path="", bf16=bf16, recompute=False,
                      token_dispatcher=None if cfg.model.token_dispatcher == "auto"
                      else cfg.model.token_dispatcher, optim=optim, fp16=fp16)
        checkpoints = CheckpointManager(run_dir / "checkpoints", every=0, final_step=-1,
                                        layout=layout)
        checkpoints.load(step, actor, None)
        actor.save_hf(out)
    finally:
        destroy_parallel()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="moerl.export", description=__doc__.split("\n\n")[0])
    parser.add_argument("run_dir", type=Path)
    parser.add_argument("--step", type=int, required=True)
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args(argv)
    try:
        export_step(args.run_dir, args.step, args.out)
    except ConfigError as err:
        print(f"moerl export: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
