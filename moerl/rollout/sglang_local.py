"""A local SGLang 0.5.23 server, started through ``launch/sglang_server.sh``: for
``rollout.server: sglang`` and for the tests that run the real server.

The server runs in SGLang's own environment (``launch/setup_sglang.sh`` builds ``.venv-sglang``
on a CPU machine; ``$MOERL_SGLANG_PYTHON`` names another interpreter, e.g. a GPU install of
``moerl[sglang]``). Lifecycle:

- ``launch_sglang`` starts a small guard process (this module's ``main``, stdlib only) in its own
  process group; the guard runs the launch script, which ``exec``s SGLang, so SGLang and its
  scheduler/detokenizer children share that group. The guard stops the group when it gets SIGTERM
  or when the process that launched it dies, so the server exits with the trainer.
- ``launch_sglang`` returns once ``/health`` answers 200 (SGLang warms up before that), or raises
  with the log's tail if the server exits or does not become healthy in time (30 minutes by
  default: on a 2-core CPU shared with other jobs a tiny model's start-up took over 10 minutes,
  and a large checkpoint on GPUs loads for minutes too).
- ``SGLangServer.stop`` is SIGTERM to the guard (by its PID) and a wait; ``kill`` is SIGKILL to
  the whole group (a crash, for tests and for a restart after a hang).
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
LAUNCH_SCRIPT = REPO / "launch" / "sglang_server.sh"
PYTHON_ENV = "MOERL_SGLANG_PYTHON"
API_KEY_ENV = "MOERL_ROLLOUT_API_KEY"
_STOP_GRACE_S = 30.0


def sglang_python() -> Path:
    """The interpreter that runs SGLang: ``$MOERL_SGLANG_PYTHON``, else ``.venv-sglang``."""
    path = Path(os.environ.get(PYTHON_ENV) or REPO / ".venv-sglang" / "bin" / "python")
    if not path.exists():
        raise FileNotFoundError(
            f"no SGLang interpreter at {path}: run launch/setup_sglang.sh (CPU) or point "
            f"${PYTHON_ENV} at a python with sglang==0.5.23 installed")
    return path


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@dataclass
class SGLangServer:
    """A running local SGLang server (see the module docstring)."""

    process: subprocess.Popen  # the guard; its process group holds SGLang
    port: int
    api_key: str | None
    log_path: Path

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def alive(self) -> bool:
        return self.process.poll() is None

    def stop(self) -> None:
        """SIGTERM to the guard, which stops SGLang; SIGKILL to the group if that hangs."""
        if self.alive():
            self.process.terminate()
            try:
                self.process.wait(_STOP_GRACE_S + 10)
            except subprocess.TimeoutExpired:
                self.kill()
        self._reap_group()

    def kill(self) -> None:
        """SIGKILL to the guard and SGLang at once (a crash)."""
        self._reap_group()
        self.process.wait()

    def _reap_group(self) -> None:
        try:
            os.killpg(self.process.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass

    def log_tail(self, num_bytes: int = 6000) -> str:
        try:
            return self.log_path.read_bytes()[-num_bytes:].decode(errors="replace")
        except OSError:
            return ""


# Set by torchrun for its workers; SGLang must not inherit them from trainer rank 0. With
# TORCHELASTIC_USE_AGENT_STORE set, torch.distributed's tcp:// rendezvous (which SGLang's
# scheduler uses for its own one-process group) makes even rank 0 a client of a store nobody
# serves, and SGLang hangs at start-up (measured: "Init parallel begin", then nothing).
_TORCHRUN_VARIABLES = ("RANK", "LOCAL_RANK", "GROUP_RANK", "ROLE_RANK", "ROLE_NAME", "WORLD_SIZE",
                       "LOCAL_WORLD_SIZE", "GROUP_WORLD_SIZE", "ROLE_WORLD_SIZE", "MASTER_ADDR",
                       "MASTER_PORT")


def server_environment(environ: dict[str, str]) -> dict[str, str]:
    """``environ`` without torchrun's worker variables (``TORCHELASTIC_*`` included) and the API
    key (``launch_sglang`` sets its own)."""
    return {k: v for k, v in environ.items()
            if k not in _TORCHRUN_VARIABLES and not k.startswith("TORCHELASTIC_")
            and k != API_KEY_ENV}


def launch_sglang(model: str | Path, *, port: int = 0, dtype: str = "float32",
                  api_key: str | None = None, device: str = "auto",
                  weight_version: str = "default", log_path: str | Path | None = None,
                  startup_timeout_s: float = 1800.0, extra_args: tuple[str, ...] = (),
                  env: dict[str, str] | None = None) -> SGLangServer:
    """Start SGLang on ``model`` and wait until it is healthy (see the module docstring).

    ``port=0`` picks a free port, and picks another (3 tries in all) if SGLang cannot bind a
    port during start-up because it was taken in the meantime (SGLang logs that and hangs; this
    stops it). ``env`` adds variables for the launch script (``TP``, ``SAMPLING_MASK_MAX_TOKENS``,
    ``DETERMINISTIC``, ...). The API key travels in the environment.
    """
    python = sglang_python()
    log_path = Path(log_path) if log_path else Path(
        tempfile.mkdtemp(prefix="moerl-sglang-")) / "server.log"
    attempts = 1 if port else _PORT_ATTEMPTS
    for attempt in range(1, attempts + 1):
        chosen = port or free_port()
        try:
            return _launch_once(model, python=python, port=chosen, dtype=dtype, api_key=api_key,
                                device=device, weight_version=weight_version, log_path=log_path,
                                startup_timeout_s=startup_timeout_s, extra_args=extra_args,
                                env=env)
        except PortClash:
            # A port picked here can be taken by another process (another server starting at
            # the same time, one of SGLang's own derived ports) before SGLang binds it, tens of
            # seconds later: then start again on a fresh port.
            if attempt == attempts:
                raise
    raise AssertionError("unreachable")


# How SGLang 0.5.23 (uvicorn, its port checks, torch.distributed) reports a port it cannot bind.
_PORT_CLASH = ("address already in use", "eaddrinuse", "port is already in use",
               "is not available in")
_PORT_ATTEMPTS = 3


def _port_clash(log_path: Path, start: int) -> bool:
    try:
        with open(log_path, "rb") as f:
            f.seek(start)
            text = f.read().decode(errors="replace").lower()
    except OSError:
        return False
    return any(marker in text for marker in _PORT_CLASH)


def _launch_once(model, *, python: Path, port: int, dtype: str, api_key: str | None,
                 device: str, weight_version: str, log_path: Path, startup_timeout_s: float,
                 extra_args: tuple[str, ...], env: dict[str, str] | None) -> SGLangServer:
    full_env = {**server_environment(os.environ), **(env or {}), "MODEL": str(model),
                "PORT": str(port), "DTYPE": dtype, "DEVICE": device, "PYTHON": str(python),
                "WEIGHT_VERSION": weight_version}
    if api_key:
        full_env[API_KEY_ENV] = api_key
    cmd = [sys.executable, "-m", "moerl.rollout.sglang_local", str(os.getpid()), "bash",
           str(LAUNCH_SCRIPT), *extra_args]
    log_start = log_path.stat().st_size if log_path.exists() else 0
    with open(log_path, "ab") as log:
        process = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=full_env,
                                   start_new_session=True, cwd=REPO)
    server = SGLangServer(process=process, port=port, api_key=api_key, log_path=log_path)
    try:
        _wait_healthy(server, startup_timeout_s, log_start=log_start)
    except PortClash:
        server.kill()  # hung after the bind error: SIGTERM would only wait out the grace period
        raise
    except BaseException:
        server.stop()
        raise
    return server


class PortClash(RuntimeError):
    """SGLang found a port it needs taken during start-up."""


def _wait_healthy(server: SGLangServer, timeout_s: float, log_start: int = 0) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        clash = _port_clash(server.log_path, log_start)
        if not server.alive():
            error = PortClash if clash else RuntimeError
            raise error(f"SGLang exited with code {server.process.returncode} during "
                        f"start-up (log {server.log_path}):\n{server.log_tail()}")
        if clash:
            # SGLang 0.5.23 logs uvicorn's bind error and then hangs instead of exiting.
            raise PortClash(f"SGLang could not bind a port during start-up (log "
                            f"{server.log_path}):\n{server.log_tail()}")
        try:
            with urllib.request.urlopen(server.url + "/health", timeout=5) as resp:
                if resp.status == 200:
                    return
        except (urllib.error.URLError, OSError):
            pass
        time.sleep(1.0)
    raise TimeoutError(f"SGLang not healthy after {timeout_s:.0f} s (log {server.log_path}):\n"
                       f"{server.log_tail()}")


# ------------------------------------------------------------------ the guard process


def _guard(parent_pid: int, cmd: list[str]) -> int:
    """Run ``cmd`` in this process group; stop it on SIGTERM or when ``parent_pid`` dies."""
    child = subprocess.Popen(cmd)
    stopping = []
    signal.signal(signal.SIGTERM, lambda *_: stopping.append(True))
    while child.poll() is None and not stopping and os.getppid() == parent_pid:
        time.sleep(0.5)
    if child.poll() is None:
        child.terminate()
        try:
            child.wait(_STOP_GRACE_S)
        except subprocess.TimeoutExpired:
            pass
    code = child.returncode
    os.killpg(0, signal.SIGKILL)  # whatever SGLang left in the group, and this guard
    return code


if __name__ == "__main__":
    sys.exit(_guard(int(sys.argv[1]), sys.argv[2:]))
