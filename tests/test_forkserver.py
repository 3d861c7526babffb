"""The test fork server (tests/forkserver.py) stands in for ``torchrun --standalone`` in most of
the suite: it must give workers what torchrun gives them and fail the way torchrun fails. Each
check runs the same probe under both and compares."""

from __future__ import annotations

import json
import sys
import time

import pytest

from e2e_util import REPO, run

PROBE = str(REPO / "tests" / "dist" / "launcher_probe.py")


def _probe(launcher: str, monkeypatch, *args: str, nproc: int = 2):
    monkeypatch.setenv("MOERL_TEST_LAUNCHER", launcher)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone",
           f"--nproc_per_node={nproc}", PROBE, *args]
    start = time.monotonic()
    proc = run(cmd, timeout=120, env={"PROBE_EXTRA": "x y"}, check=False)
    return proc, time.monotonic() - start


def _seen(proc) -> list[dict]:
    rows = [json.loads(line[len("PROBE "):]) for line in proc.stdout.splitlines()
            if line.startswith("PROBE ")]
    return sorted(rows, key=lambda r: r["RANK"])


@pytest.mark.parametrize("nproc", [1, 2, 3])
def test_workers_see_what_torchrun_gives_them(monkeypatch, nproc):
    real, _ = _probe("torchrun", monkeypatch, "--a", "b c", nproc=nproc)
    ours, _ = _probe("forkserver", monkeypatch, "--a", "b c", nproc=nproc)
    assert real.returncode == ours.returncode == 0, (real.stderr[-2000:], ours.stderr[-2000:])
    assert len(_seen(real)) == nproc
    assert _seen(ours) == _seen(real)


def test_a_failing_worker_fails_the_job_and_stops_the_others(monkeypatch):
    for launcher in ("torchrun", "forkserver"):
        proc, took = _probe(launcher, monkeypatch, "--fail-rank", "1")
        assert proc.returncode == 1, (launcher, proc.returncode, proc.stderr[-2000:])
        assert "rank failing on purpose" in proc.stderr
        assert took < 90, (launcher, took)  # the sleeping rank was stopped, not waited for
        assert not _seen(proc)


def test_a_job_past_its_timeout_is_killed(monkeypatch):
    import subprocess

    monkeypatch.setenv("MOERL_TEST_LAUNCHER", "forkserver")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           PROBE, "--fail-rank", "7"]  # no rank fails: both sleep
    start = time.monotonic()
    with pytest.raises(subprocess.TimeoutExpired):
        run(cmd, timeout=5, check=False)
    assert time.monotonic() - start < 30
