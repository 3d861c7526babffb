"""Resumable checkpoints: every rank's model shard and optimizer state, written atomically and
verified before they are trusted.

Layout: ``<out_dir>/checkpoints/step_000010/{actor,critic}/rank_00000.pt`` (one per rank) and
``meta.json``, which records the step, the parallel layout and, per rank, the SHA-256 of every
shard file that rank wrote.

Writing: into ``step_000010.tmp``; each rank fsyncs its shards and hashes them; rank 0 writes
``meta.json`` (temp file, fsync, rename), fsyncs the directory and renames it to ``step_000010``
once every rank has finished. A run killed mid-save leaves the previous checkpoint as the latest.

Loading (:meth:`CheckpointManager.resume`): the newest checkpoint is verified first: ``meta.json``
parses, names its own step and this run's layout, and every rank's shards match their checksums
(each rank checks its own, so a shard truncated, emptied or copied from another step is caught
before ``torch.load`` sees it). A checkpoint that fails is skipped with a warning naming the file
and what was wrong, and the next older one is tried. A different parallel layout is a
configuration mistake, not damage, and stops the run. Files hold tensors and plain containers
only and load with ``torch.load(weights_only=True)`` (``TrainerOptimizer.save``/``load``).

What is *not* in a checkpoint, because it is a pure function of ``(seed, step)``: the prompts,
the rollout seeds, the mini-batch shuffles. The rollout server's weights are not either: on
resume the trainer pushes its restored weights to the server before the first rollout.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
from pathlib import Path

import torch.distributed as dist

from moerl.config import ConfigError

log = logging.getLogger("moerl")

_LAYOUT_KEYS = ("world", "tp", "ep", "etp")
_FORMAT = 2  # 1: no step check, no checksums (meta held the layout keys at the top level)


class CheckpointManager:
    def __init__(self, root: Path, *, every: int, final_step: int, layout, keep_last: int = 2):
        self.root, self.every, self.final_step = Path(root), every, final_step
        self.layout, self.keep_last = layout, keep_last

    def path(self, step: int) -> Path:
        return self.root / f"step_{step:06d}"

    def due(self, step: int) -> bool:
        return step == self.final_step or (self.every > 0 and step % self.every == 0)

    def steps(self) -> list[int]:
        """Steps of the finished (renamed) checkpoint directories, newest first."""
        found = []
        for p in self.root.glob("step_*"):
            suffix = p.name.removeprefix("step_")
            if p.is_dir() and suffix.isdigit():
                found.append(int(suffix))
        return sorted(found, reverse=True)

    # ------------------------------------------------------------------ saving

    def save(self, step: int, run) -> None:
        tmp = self.root / f"step_{step:06d}.tmp"
        if self.layout.rank == 0:
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
        dist.barrier()
        files = [run.actor.save(tmp / "actor")]
        if run.critic is not None:
            files.append(run.critic.save(tmp / "critic"))
        mine = {str(Path(f).relative_to(tmp)): _sha256_synced(Path(f)) for f in files}
        shards: list = [None] * self.layout.world
        dist.all_gather_object(shards, mine)
        if self.layout.rank == 0:
            meta = {"format": _FORMAT, "step": step, "layout": self._layout(), "shards": shards}
            _write_atomic(tmp / "meta.json", json.dumps(meta, indent=1))
            _fsync_dir(tmp)
            final = self.path(step)
            shutil.rmtree(final, ignore_errors=True)
            tmp.rename(final)
            _fsync_dir(self.root)
            self._prune()
        dist.barrier()

    def _prune(self) -> None:
        for step in self.steps()[self.keep_last:]:
            shutil.rmtree(self.path(step), ignore_errors=True)
        for stale in self.root.glob("step_*.tmp"):  # left by runs killed mid-save
            shutil.rmtree(stale, ignore_errors=True)

    # ------------------------------------------------------------------ loading

    def resume(self, actor, critic) -> int:
        """Load the newest intact checkpoint (collective); its step, or 0 when there is none."""
        step = self.resume_step()
        if step is None:
            return 0
        self.load_intact(step, actor, critic)
        return step

    def load_intact(self, step: int, actor, critic) -> None:
        """Load checkpoint ``step`` that :meth:`resume_step` just verified (collective)."""
        self._load_files(step, actor, critic)
        log.warning("resumed from step %d (%s)", step, self.path(step))

    def resume_step(self) -> int | None:
        """The step of the newest intact checkpoint (collective: every rank verifies its own
        files), or None when there is none; nothing is loaded. Damaged ones are skipped with a
        warning; ConfigError when there are checkpoints and none is intact."""
        candidates = self.steps()
        for step in candidates:
            bad = self._problems(step)
            if not bad:
                return step
            if self.layout.rank == 0:
                for rank, problem in bad:
                    log.warning("checkpoint %s is damaged and skipped (rank %d): %s",
                                self.path(step), rank, problem)
        if candidates:
            raise ConfigError(f"no intact checkpoint in {self.root} (tried steps {candidates}; "
                              f"the warnings above say what was wrong): move the directory "
                              f"away, or set training.resume=false to start over")
        return None

    def load(self, step: int, actor, critic) -> None:
        """Load checkpoint ``step`` (collective), verified like a resume; a damaged one raises
        ConfigError with what every rank found wrong."""
        bad = self._problems(step)
        if bad:
            raise ConfigError(f"checkpoint {self.path(step)} is damaged: " + "; ".join(
                f"rank {rank}: {problem}" for rank, problem in bad))
        self._load_files(step, actor, critic)

    def _problems(self, step: int) -> list[tuple[int, str]]:
        """(rank, problem) for every rank whose view of checkpoint ``step`` is damaged."""
        problems: list = [None] * self.layout.world
        dist.all_gather_object(problems, self.verify(step))
        return [(rank, p) for rank, p in enumerate(problems) if p is not None]

    def _load_files(self, step: int, actor, critic) -> None:
        actor.load(self.path(step) / "actor")
        if critic is not None:
            critic.load(self.path(step) / "critic")

    def verify(self, step: int) -> str | None:
        """What is wrong with this rank's view of checkpoint ``step``, or None when intact.
        A layout different from this run's raises ConfigError (a mistake, not damage)."""
        path = self.path(step)
        meta_file = path / "meta.json"
        try:
            meta = json.loads(meta_file.read_text())
        except FileNotFoundError:
            return f"{meta_file} is missing"
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
            return f"{meta_file} is unreadable ({type(err).__name__}: {err})"
        if not isinstance(meta, dict) or meta.get("format") != _FORMAT:
            return f"{meta_file} is not a format-{_FORMAT} checkpoint record (no checksums)"
        if meta.get("step") != step:
            return f"{meta_file} belongs to step {meta.get('step')}, not {step}"
        if meta.get("layout") != self._layout():
            raise ConfigError(
                f"checkpoint {path} was written with layout {meta.get('layout')}, this run is "
                f"{self._layout()}: resume with the same parallel layout (or export HF weights "
                f"and start a new run from them)")
        shards = meta.get("shards")
        if not isinstance(shards, list) or len(shards) != self.layout.world:
            return f"{meta_file} lists no shards for {self.layout.world} ranks"
        for rel, digest in sorted(shards[self.layout.rank].items()):
            problem = _check_file(path / rel, digest)
            if problem:
                return problem
        return None

    def _layout(self) -> dict:
        return {k: getattr(self.layout, k) for k in _LAYOUT_KEYS}


def _check_file(file: Path, digest: str) -> str | None:
    if not file.is_file():
        return f"{file} is missing"
    size = file.stat().st_size
    if size == 0:
        return f"{file} is empty"
    if _sha256(file) != digest:
        return (f"{file} ({size} bytes) does not match its checksum in meta.json: truncated, "
                f"damaged or copied from another checkpoint")
    return None


def _sha256(file: Path) -> str:
    h = hashlib.sha256()
    with file.open("rb") as fh:
        for block in iter(lambda: fh.read(1 << 22), b""):
            h.update(block)
    return h.hexdigest()


def _sha256_synced(file: Path) -> str:
    """The file's checksum, after forcing it to stable storage."""
    with file.open("rb+") as fh:
        os.fsync(fh.fileno())
    return _sha256(file)


def _write_atomic(file: Path, text: str) -> None:
    tmp = file.with_name(file.name + ".tmp")
    with tmp.open("w") as fh:
        fh.write(text)
        fh.flush()
        os.fsync(fh.fileno())
    tmp.replace(file)


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
