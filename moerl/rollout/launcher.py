"""Starting moerl's built-in rollout server as a subprocess: the trainer's side of the wire.

:func:`launch_server` runs ``python -m moerl.rollout.server`` (free port picked by the OS), waits
until ``/health`` answers and returns a :class:`ServerHandle`. Nothing here imports the engine,
torch or transformers: a trainer that only talks to servers (SGLang, external ones) never loads
the built-in engine. (Moved from ``moerl.rollout.server``, which still exports both names.)
"""

from __future__ import annotations

import os
import secrets
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

API_KEY_ENV = "MOERL_ROLLOUT_API_KEY"


@dataclass
class ServerHandle:
    """A server subprocess started by :func:`launch_server`."""

    process: subprocess.Popen
    host: str
    port: int
    api_key: str | None
    log_path: Path

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def stop(self, timeout_s: float = 30.0) -> None:
        """Graceful shutdown (SIGTERM), then SIGKILL if it does not exit in time."""
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout_s)
            except subprocess.TimeoutExpired:
                self.kill()

    def kill(self) -> None:
        """Immediate SIGKILL (simulates a crash)."""
        if self.process.poll() is None:
            self.process.kill()
        self.process.wait()

    def log_tail(self, num_bytes: int = 4000) -> str:
        try:
            return self.log_path.read_bytes()[-num_bytes:].decode(errors="replace")
        except OSError:
            return ""


def launch_server(model: str | Path, *, host: str = "127.0.0.1", port: int = 0,
                  api_key: str | None = "auto", dtype: str = "float32", seed: int = 0,
                  max_batch_size: int = 64, sampling_mask_max_tokens: int = 4096,
                  log_level: str = "warning", num_threads: int = 0,
                  extra_args: tuple[str, ...] = (), log_path: str | Path | None = None,
                  startup_timeout_s: float = 180.0) -> ServerHandle:
    """Start ``python -m moerl.rollout.server`` and wait until ``/health`` answers.

    ``port=0`` lets the OS pick a free port (read back from ``--port-file``, so there is no
    pick-then-bind race). ``api_key="auto"`` generates a random key (the handle carries it), so
    the mutating endpoints work; pass ``None`` for a server without a key. The key travels in the
    environment, not on the command line.
    """
    if api_key == "auto":
        api_key = secrets.token_hex(16)
    workdir = Path(tempfile.mkdtemp(prefix="moerl-rollout-"))
    port_file = workdir / "port"
    log_path = Path(log_path) if log_path else workdir / "server.log"
    cmd = [sys.executable, "-m", "moerl.rollout.server", "--model", str(model), "--host", host,
           "--port", str(port), "--port-file", str(port_file), "--dtype", dtype, "--seed",
           str(seed), "--max-batch-size", str(max_batch_size), "--sampling-mask-max-tokens",
           str(sampling_mask_max_tokens), "--log-level", log_level, "--num-threads",
           str(num_threads), "--exit-with-parent", str(os.getpid()), *extra_args]
    env = {k: v for k, v in os.environ.items() if k != API_KEY_ENV}
    if api_key:
        env[API_KEY_ENV] = api_key
    with open(log_path, "ab") as log:
        process = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env)
    handle = ServerHandle(process=process, host=host, port=port, api_key=api_key,
                          log_path=log_path)
    deadline = time.monotonic() + startup_timeout_s
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"rollout server exited with code {process.returncode}:\n"
                               f"{handle.log_tail()}")
        if port_file.exists():
            handle.port = int(port_file.read_text())
            try:
                with urllib.request.urlopen(handle.url + "/health", timeout=2) as r:
                    if r.status == 200:
                        return handle
            except (urllib.error.URLError, OSError):
                pass
        time.sleep(0.1)
    handle.kill()
    raise TimeoutError(f"rollout server not healthy after {startup_timeout_s}s:\n"
                       f"{handle.log_tail()}")
