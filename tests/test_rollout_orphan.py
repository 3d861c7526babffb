"""A built-in server whose launcher dies without stopping it (a trainer killed with SIGKILL)
shuts itself down instead of holding its port and CPU forever."""

import os
import signal
import subprocess
import sys
import time

LAUNCHER = """
import sys, time
from moerl.rollout.server import launch_server
handle = launch_server(sys.argv[1], port=0, num_threads=1)
print(handle.process.pid, flush=True)
time.sleep(600)
"""


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # A zombie (exited, not yet reaped by init) counts as gone.
    with open(f"/proc/{pid}/stat") as fh:
        return fh.read().split(")")[-1].split()[0] != "Z"


def test_server_exits_when_launcher_is_killed(tmp_path):
    from moerl.tiny_model import create_tiny_hf_model

    model = create_tiny_hf_model(tmp_path / "hf")
    launcher = subprocess.Popen([sys.executable, "-c", LAUNCHER, str(model)],
                                stdout=subprocess.PIPE, text=True)
    server_pid = int(launcher.stdout.readline())
    assert _alive(server_pid)
    launcher.send_signal(signal.SIGKILL)
    launcher.wait()
    deadline = time.monotonic() + 30
    while _alive(server_pid) and time.monotonic() < deadline:
        time.sleep(0.2)
    if _alive(server_pid):
        os.kill(server_pid, signal.SIGKILL)
        raise AssertionError("the server outlived its launcher by 30 s")
