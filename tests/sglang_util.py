"""Starting a real SGLang 0.5.23 server for the tests marked ``sglang``.

The server runs in SGLang's own venv (``launch/setup_sglang.sh``, which ``tools/test.sh`` runs
unless ``MOERL_SKIP_SGLANG=1``). When that venv is absent the tests skip, saying how to get it;
when ``tools/test.sh`` asked for them (``MOERL_REQUIRE_SGLANG=1``) its absence is a failure.
Each server takes ~2 GB and busy-polls a core, so tests share one per module and stop it by PID.
"""

from __future__ import annotations

import contextlib
import os
import signal

import pytest

from moerl.rollout.sglang_local import launch_sglang, sglang_python


def require_sglang_python():
    try:
        return sglang_python()
    except FileNotFoundError as err:
        if os.environ.get("MOERL_REQUIRE_SGLANG") == "1":
            pytest.fail(str(err))
        pytest.skip(str(err))


@contextlib.contextmanager
def running_sglang(model_dir, **kwargs):
    """A real SGLang server on ``model_dir`` for the duration of the block."""
    require_sglang_python()
    server = launch_sglang(model_dir, **kwargs)
    try:
        yield server
    finally:
        server.stop()


def freeze(server) -> None:
    """SIGSTOP every process of ``server`` (its launcher's process group): it accepts connections
    (the kernel queues them) but answers nothing, so requests sent to it are still pending when
    the test kills it, however fast the machine generates. ``server.kill()`` ends it (SIGKILL
    reaches stopped processes)."""
    os.killpg(server.process.pid, signal.SIGSTOP)
