"""One run per out_dir, and no process outliving its launcher.

- :class:`OutDirLock`: trainer rank 0 holds an exclusive ``fcntl.flock`` on
  ``<out_dir>/.moerl.lock`` for the whole run. A second run on the same out_dir stops with the
  holder's pid, host and start time. The kernel releases a flock when its holder dies, however it
  dies, so a lock left by a killed run is never stale: the next run simply takes it.
- :func:`exit_with_launcher`: torchrun starts each worker in a session of its own, so a signal to
  the launch command's process group never reaches them. Each worker asks the kernel
  (``prctl(PR_SET_PDEATHSIG)``) to be SIGKILLed when its parent, the torchrun agent, dies; where
  that call does not exist a watchdog thread notices the re-parenting within a second. Rank 0's
  built-in rollout server follows rank 0 the same way (``--exit-with-parent``). Killing a worker
  mid-step is safe: checkpoints are written atomically.
"""

from __future__ import annotations

import ctypes
import datetime
import fcntl
import json
import os
import signal
import socket
import sys
import threading
import time
from pathlib import Path

from moerl.config import ConfigError

LOCK_NAME = ".moerl.lock"
_PR_SET_PDEATHSIG = 1


class OutDirLock:
    """An exclusive, non-blocking lock on a run directory, held until :meth:`release` or death."""

    def __init__(self, out_dir: str | Path):
        self.path = Path(out_dir) / LOCK_NAME
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(self._fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(self._fd)
            raise ConfigError(describe_holder(self.path)) from None
        holder = {"pid": os.getpid(), "host": socket.gethostname(),
                  "since": datetime.datetime.now().isoformat(timespec="seconds")}
        os.ftruncate(self._fd, 0)
        os.pwrite(self._fd, json.dumps(holder).encode(), 0)

    def release(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)  # closing the last descriptor releases the flock
            self._fd = -1


def describe_holder(path: Path) -> str:
    try:
        holder = json.loads(path.read_text())
        who = f"pid {holder['pid']} on host {holder['host']}, since {holder['since']}"
    except (OSError, ValueError, KeyError, TypeError):
        who = "a process that has not recorded itself yet"
    return (f"training.out_dir={path.parent} is in use by another run ({who}): wait for it to "
            f"finish, stop it, or set training.out_dir to another directory")


def is_locked(out_dir: str | Path) -> str | None:
    """The holder's description when another process holds the lock of ``out_dir``, else None."""
    path = Path(out_dir) / LOCK_NAME
    if not path.is_file():
        return None
    fd = os.open(path, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except BlockingIOError:
        return describe_holder(path)
    finally:
        os.close(fd)  # also drops the probe's own shared lock
    return None


def exit_with_launcher() -> None:
    """Die when the parent process does (call first thing in a torchrun worker)."""
    parent = os.getppid()
    if sys.platform.startswith("linux"):
        libc = ctypes.CDLL(None, use_errno=True)
        if libc.prctl(_PR_SET_PDEATHSIG, int(signal.SIGKILL), 0, 0, 0) != 0:
            _start_watchdog(parent)
    else:
        _start_watchdog(parent)
    if os.getppid() != parent:  # the parent died before the request took effect
        os._exit(1)


def _start_watchdog(parent: int) -> None:
    def watch():
        while os.getppid() == parent:
            time.sleep(1.0)
        os._exit(1)

    threading.Thread(target=watch, name="moerl-launcher-watchdog", daemon=True).start()
