"""Resumable checkpoints: every rank's model shard and optimizer state, written atomically.

Layout: ``<out_dir>/checkpoints/step_000010/{actor,critic}/rank_00000.pt`` (one per rank) and
``meta.json``.
A checkpoint is written into ``step_000010.tmp`` and renamed by rank 0 once every rank has
finished, so a run killed mid-save leaves the previous checkpoint as the latest. Files hold tensors
and plain containers only and load with ``torch.load(weights_only=True)`` (``TrainerOptimizer.save``/``load``).

What is *not* in a checkpoint, because it is a pure function of ``(seed, step)``: the prompts,
the rollout seeds, the mini-batch shuffles. The rollout server's weights are not either: on
resume the trainer pushes its restored weights to the server before the first rollout.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch.distributed as dist


class CheckpointManager:
    def __init__(self, root: Path, *, every: int, final_step: int, layout, keep_last: int = 2):
        self.root, self.every, self.final_step = Path(root), every, final_step
        self.layout, self.keep_last = layout, keep_last

    def path(self, step: int) -> Path:
        return self.root / f"step_{step:06d}"

    def due(self, step: int) -> bool:
        return step == self.final_step or (self.every > 0 and step % self.every == 0)

    def latest(self) -> int | None:
        steps = [int(p.name.removeprefix("step_")) for p in self.root.glob("step_*")
                 if p.is_dir() and not p.name.endswith(".tmp") and (p / "meta.json").exists()]
        return max(steps, default=None)

    def save(self, step: int, run) -> None:
        tmp = self.root / f"step_{step:06d}.tmp"
        if self.layout.rank == 0:
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
        dist.barrier()
        run.actor.save(tmp / "actor")
        if run.critic is not None:
            run.critic.save(tmp / "critic")
        if self.layout.rank == 0:
            (tmp / "meta.json").write_text(json.dumps(
                {"step": step, "world": self.layout.world, "tp": self.layout.tp,
                 "ep": self.layout.ep, "etp": self.layout.etp}))
            final = self.path(step)
            shutil.rmtree(final, ignore_errors=True)
            tmp.rename(final)
            for old in sorted(self.root.glob("step_*"))[:-self.keep_last]:
                if not old.name.endswith(".tmp"):
                    shutil.rmtree(old, ignore_errors=True)
        dist.barrier()

    def load(self, step: int, actor, critic) -> int:
        path = self.path(step)
        meta = json.loads((path / "meta.json").read_text())
        layout = {k: getattr(self.layout, k) for k in ("world", "tp", "ep", "etp")}
        saved = {k: meta[k] for k in layout}
        if saved != layout:
            raise ValueError(f"checkpoint {path} was written with layout {saved}, this run is "
                             f"{layout}: resume with the same parallel layout (or export HF "
                             f"weights and start a new run from them)")
        actor.load(path / "actor")
        if critic is not None:
            critic.load(path / "critic")
        return step
