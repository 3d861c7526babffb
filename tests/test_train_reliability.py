"""Reliability of the RL loop: resume after a kill, rollout-server death, configuration
mistakes that fail before work starts, non-finite steps."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest

from e2e_util import REPO, fast_overrides, read_metrics, torchrun

# Wall-clock and restart counters legitimately differ between a resumed and a straight run.
VOLATILE = ("time/", "rollout/server_restarts")


def _launch(args, log):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           "-m", "moerl.train", *args]
    return subprocess.Popen(cmd, cwd=REPO, stdout=log, stderr=subprocess.STDOUT,
                            env={**os.environ, "OMP_NUM_THREADS": "1"}, start_new_session=True)


def _descendants(pid: int) -> list[tuple[int, str]]:
    """(pid, command line) of every process below ``pid``. torchrun starts each worker in a
    session of its own, so a process-group kill would miss them."""
    out = subprocess.run(["ps", "-eo", "pid=,ppid=,args="], capture_output=True,
                         text=True).stdout
    children: dict[int, list[tuple[int, str]]] = {}
    for line in out.splitlines():
        child, parent, args = line.split(None, 2)
        children.setdefault(int(parent), []).append((int(child), args))
    found, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            found.append(child)
            todo.append(child[0])
    return found


def _kill_tree(proc) -> None:
    """SIGKILL torchrun, its workers and the rollout server, all at once (a crash)."""
    for pid in [proc.pid] + [p for p, _ in _descendants(proc.pid)]:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    proc.wait()


def _wait_for(predicate, proc, timeout, what):
    deadline = time.monotonic() + timeout
    while not predicate():
        if proc.poll() is not None:
            raise AssertionError(f"training exited ({proc.returncode}) before {what}")
        if time.monotonic() > deadline:
            _kill_tree(proc)
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.05)


def test_resume_after_kill_reproduces_uninterrupted_run(warm_model, tmp_path):
    # With the server decoding one sequence at a time its outputs do not depend on which
    # requests happen to arrive together, so the whole run is reproducible bit for bit.
    extra = {"training.steps": 4, "training.checkpoint_every": 2, "training.eval_every": 2,
             "rollout.engine_max_batch_size": 1}
    straight = tmp_path / "straight"
    torchrun(["configs/grpo.yaml", *fast_overrides(warm_model, straight, **extra)], timeout=420)

    resumed = tmp_path / "resumed"
    args = ["configs/grpo.yaml", *fast_overrides(warm_model, resumed, **extra)]
    with open(tmp_path / "first.log", "wb") as log:
        proc = _launch(args, log)
        ckpt = resumed / "checkpoints" / "step_000002" / "meta.json"
        _wait_for(ckpt.exists, proc, 420, "the step-2 checkpoint")
        _kill_tree(proc)
    killed_at = sorted(p.name for p in (resumed / "checkpoints").glob("step_*"))
    assert "step_000004" not in killed_at, "the run finished before it could be killed"
    torchrun(args, timeout=420)

    a, b = read_metrics(straight), read_metrics(resumed)
    assert [r["step"] for r in a] == [r["step"] for r in b] == [0, 1, 2, 3, 4]
    for ra, rb in zip(a, b):
        assert ra.keys() == rb.keys()
        differing = {k: (ra[k], rb[k]) for k in ra
                     if not k.startswith(VOLATILE) and ra[k] != rb[k]}
        assert not differing, (ra["step"], differing)


def test_rollout_server_death_loses_no_sample(warm_model, tmp_path):
    out = tmp_path / "run"
    args = ["configs/grpo.yaml", *fast_overrides(
        warm_model, out, **{"training.steps": 5, "rollout.max_new_tokens": 6})]
    with open(tmp_path / "train.log", "wb") as log:
        proc = _launch(args, log)
        metrics = out / "metrics.jsonl"
        _wait_for(lambda: metrics.exists() and metrics.read_text().count("\n") >= 1, proc, 420,
                  "the first step")
        pids = [pid for pid, args in _descendants(proc.pid) if "moerl.rollout.server" in args]
        assert len(pids) == 1, pids
        os.kill(pids[0], signal.SIGKILL)
        assert proc.wait(timeout=420) == 0, (tmp_path / "train.log").read_text()[-4000:]
    records = read_metrics(out)
    assert [r["step"] for r in records] == [0, 1, 2, 3, 4]
    assert records[-1]["rollout/server_restarts"] >= 1
    assert all(r["rollout/num_samples"] == 16 for r in records)  # 4 prompts x 4 samples


@pytest.mark.parametrize("override, message", [
    ("parallel.tp=3", "parallel.tp=3 does not divide num_attention_heads=4"),
    ("parallel.ep=3", "parallel.ep=3 does not divide num_experts=8"),
    ("parallel.etp=3", "parallel.etp=3 does not divide the expert FFN width 32"),
])
def test_layout_mistakes_fail_before_work(override, message, warm_model, tmp_path):
    proc = subprocess.run(
        [sys.executable, "-m", "moerl.train", "configs/grpo.yaml",
         *fast_overrides(warm_model, tmp_path / "run"), "--set", override],
        cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert message in proc.stderr
    assert not (tmp_path / "run").exists()  # nothing started


def test_mask_without_truncation_fails_before_work(warm_model, tmp_path):
    proc = subprocess.run(
        [sys.executable, "-m", "moerl.train", "configs/grpo.yaml", "--keep-sampling-mask",
         *fast_overrides(warm_model, tmp_path / "run")],
        cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert "--keep-sampling-mask needs a truncating sampler" in proc.stderr


def test_nonfinite_skip_and_reference_swap(warm_model):
    proc = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
         str(REPO / "tests" / "dist" / "actor_checks.py"), str(warm_model)],
        cwd=REPO, capture_output=True, text=True, timeout=300,
        env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-4000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result["nan_step"]["ok"] is False and result["nan_step"]["unchanged"]
    assert "non-finite" in result["nan_step"]["reason"]
    assert result["good_step"]["ok"] and result["identical_to_clean_run"]
    # The reference is the initial policy, swapped in and out of the one Megatron model.
    assert result["good_step"]["ref_is_initial"] and result["good_step"]["policy_moved"]
    assert result["good_step"]["weights_restored"]


def _external_server(model, tmp_path, *extra):
    from moerl.rollout.server import launch_server

    return launch_server(model, port=0, api_key="k", num_threads=1, extra_args=extra,
                         log_path=tmp_path / "server.log")


def test_keep_routing_without_routes_from_the_server_fails_before_work(warm_model, tmp_path):
    server = _external_server(warm_model, tmp_path, "--disable-return-routed-experts")
    try:
        out = tmp_path / "run"
        proc = torchrun(["configs/grpo.yaml", "--keep-routing", *fast_overrides(
            warm_model, out, **{"rollout.server": "external", "rollout.url": server.url,
                                "rollout.api_key": "k"})], timeout=300, check=False)
    finally:
        server.stop()
    assert proc.returncode != 0
    assert "cannot serve this run" in proc.stderr and "--enable-return-routed-experts" in proc.stderr
    assert not (out / "metrics.jsonl").exists()


def test_telemetry_routes_are_optional_without_keep_routing(warm_model, tmp_path):
    server = _external_server(warm_model, tmp_path, "--disable-return-routed-experts")
    try:
        out = tmp_path / "run"
        proc = torchrun(["configs/grpo.yaml", *fast_overrides(
            warm_model, out, **{"rollout.server": "external", "rollout.url": server.url,
                                "rollout.api_key": "k", "training.steps": 1})], timeout=300)
    finally:
        server.stop()
    assert "does not return routes" in proc.stderr
    record = read_metrics(out)[0]
    assert "routing/route_agreement" not in record and record["loss"] == record["loss"]
