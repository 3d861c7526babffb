"""Per-step metrics: a JSONL file, TensorBoard scalars, and a console progress bar (rank 0 only).

``metrics.jsonl`` holds one JSON object per step (``{"step": k, "reward/mean": ...}``). On resume
the lines of steps at or after the resume point are dropped first, so an interrupted-and-resumed
run leaves exactly the file an uninterrupted run would have. A rerun of a finished run (resume
point at ``total_steps``) touches neither the file nor the TensorBoard events: the record of step
``total_steps`` is the finished run's final evaluation, which nothing would write again.
Non-finite values (a skipped optimizer step's loss) are kept visible as the strings ``"nan"``,
``"inf"``, ``"-inf"``, since JSON has no such numbers.
"""

from __future__ import annotations

import contextlib
import json
import math
import sys
import time
from pathlib import Path

# Shown on the progress line, in this order, when present.
_HEADLINE = ("score/mean", "eval/accuracy", "mismatch/k3", "routing/route_agreement",
             "clipfrac", "grad_norm", "time/step")


class Telemetry:
    def __init__(self, out_dir: str | Path, *, total_steps: int, start_step: int,
                 tensorboard: bool, progress: bool, enabled: bool, wandb: dict | None = None):
        """``wandb``: ``{"project", "mode", "config", "name"}`` to log to Weights & Biases too
        (its files under out_dir/wandb; offline mode needs no network), None for no W&B."""
        # A finished run's records are final: a rerun has nothing to add and must not truncate.
        self.enabled = enabled and start_step < total_steps
        self.path = Path(out_dir) / "metrics.jsonl"
        self._tb = None
        self._progress = None
        self._wandb = None
        if not self.enabled:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._truncate(start_step)
        if wandb is not None:
            self._wandb = _start_wandb(Path(out_dir), **wandb)
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self._tb = SummaryWriter(str(Path(out_dir) / "tb"), purge_step=start_step)
        if progress:
            from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn
            from rich.progress import TimeRemainingColumn

            self._progress = Progress(TextColumn("[bold]RL"), BarColumn(), MofNCompleteColumn(),
                                      TimeRemainingColumn(), TextColumn("{task.description}"),
                                      transient=False, disable=not sys.stderr.isatty())
            self._task = self._progress.add_task("", total=total_steps, completed=start_step)
            self._progress.start()

    def _truncate(self, start_step: int) -> None:
        if not self.path.exists():
            return
        kept = [line for line in self.path.read_text().splitlines()
                if line.strip() and json.loads(line)["step"] < start_step]
        self.path.write_text("".join(line + "\n" for line in kept))

    def log(self, step: int, metrics: dict[str, float]) -> None:
        if not self.enabled:
            return
        record = {"step": step, **{k: _plain(v) for k, v in sorted(metrics.items())}}
        with self.path.open("a") as fh:
            fh.write(json.dumps(record) + "\n")
        if self._tb is not None:
            for key, value in record.items():
                if key != "step" and isinstance(value, (int, float)) and math.isfinite(value):
                    self._tb.add_scalar(key, value, step)
            self._tb.flush()
        if self._wandb is not None:
            self._wandb.log({k: v for k, v in record.items() if k != "step"
                             and isinstance(v, (int, float))}, step=step)
        summary = "  ".join(f"{k.split('/')[-1] if k != 'score/mean' else 'score'}="
                            f"{_short(record[k])}" for k in _HEADLINE if k in record)
        if self._progress is not None and self._progress.console.is_terminal:
            self._progress.update(self._task, advance=1, description=summary)
        else:
            print(f"step {step}: {summary}", flush=True)

    def close(self) -> None:
        if self._progress is not None:
            self._progress.stop()
        if self._wandb is not None:
            self._wandb.finish()
            self._wandb = None
        if self._tb is not None:
            self._tb.close()


def _start_wandb(out_dir: Path, *, project: str, mode: str, config: dict, name: str):
    try:
        import wandb
    except ImportError:
        raise ValueError("logging.wandb=true needs the wandb package: pip install wandb") from None
    return wandb.init(project=project, mode=mode, dir=str(out_dir), config=config, name=name,
                      settings=wandb.Settings(console="off", x_disable_stats=True))


def _plain(value):
    if hasattr(value, "item"):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)  # JSON has no NaN/inf; keep them visible as strings
    return value


def _short(value) -> str:
    return f"{value:.4g}" if isinstance(value, (int, float)) else str(value)


class StageTimer:
    """Wall-clock seconds per pipeline stage, reported as ``time/<stage>`` metrics."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}

    @contextlib.contextmanager
    def __call__(self, stage: str):
        start = time.perf_counter()
        try:
            yield
        finally:
            self.seconds[stage] = self.seconds.get(stage, 0.0) + time.perf_counter() - start

    def metrics(self) -> dict[str, float]:
        out = {f"time/{k}": round(v, 4) for k, v in self.seconds.items()}
        out["time/step"] = round(sum(self.seconds.values()), 4)
        return out
