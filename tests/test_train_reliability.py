"""Reliability of the RL loop: resume after a kill, rollout-server death, configuration
mistakes that fail before work starts, non-finite steps."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from e2e_util import REPO, fast_overrides, read_metrics, run, torchrun

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


def test_killing_the_launch_command_stops_workers_and_server(warm_model, tmp_path):
    from moerl.run_guard import is_locked

    out = tmp_path / "run"
    args = ["configs/grpo.yaml", *fast_overrides(warm_model, out, **{"training.steps": 50})]
    with open(tmp_path / "train.log", "wb") as log:
        proc = _launch(args, log)  # torchrun leads its own process group, as local.sh's would
        metrics = out / "metrics.jsonl"
        _wait_for(lambda: metrics.exists() and metrics.read_text().count("\n") >= 1, proc, 420,
                  "the first step")
        tree = [(pid, _cmdline(pid)) for pid, _ in _descendants(proc.pid)]
        assert sum("moerl.train" in a for _, a in tree) == 2, tree
        assert any("moerl.rollout.server" in a for _, a in tree), tree
        assert "pid" in (is_locked(out) or ""), "the running trainer does not hold its out_dir"
        os.killpg(proc.pid, signal.SIGKILL)  # what a kill of the launch command's group does
        proc.wait()
    deadline = time.monotonic() + 120
    while (alive := [(p, a) for p, a in tree if _alive(p, a)]) and time.monotonic() < deadline:
        time.sleep(0.2)
    for pid, _ in alive:  # leave nothing behind, whatever the outcome
        os.kill(pid, signal.SIGKILL)
    assert not alive, f"outlived their launcher: {alive}"
    deadline = time.monotonic() + 60
    while is_locked(out) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert is_locked(out) is None  # a rerun may take the out_dir over


def _cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode().strip()
    except OSError:
        return ""


def _alive(pid: int, cmdline: str) -> bool:
    """Still running (not a zombie) and still the same program (pids are reused)."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z" and _cmdline(pid) == cmdline


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
    proc = run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
         str(REPO / "tests" / "dist" / "actor_checks.py"), str(warm_model)],
        timeout=300, check=False)
    assert proc.returncode == 0, proc.stderr[-4000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result["nan_step"]["ok"] is False and result["nan_step"]["unchanged"]
    assert "non-finite" in result["nan_step"]["reason"]
    assert result["good_step"]["ok"] and result["identical_to_clean_run"]
    # The reference is the initial policy, swapped in and out of the one Megatron model.
    assert result["good_step"]["ref_is_initial"] and result["good_step"]["policy_moved"]
    assert result["good_step"]["weights_restored"]


def _nan_reference(model_dir, out):
    """A copy of the model whose final norm is NaN: a corrupt reference checkpoint. The rollout
    (the policy) is unaffected; with the k2 estimator, whose gradient is the log-ratio itself,
    every gradient is non-finite (k3 clamps the log-ratio, and a clamp passes no gradient)."""
    import shutil

    from safetensors.torch import load_file, save_file

    shutil.copytree(model_dir, out)
    for file in out.glob("*.safetensors"):
        tensors = load_file(file)
        if "model.norm.weight" in tensors:
            tensors["model.norm.weight"] = torch.full_like(tensors["model.norm.weight"],
                                                           float("nan"))
            save_file(tensors, file, metadata={"format": "pt"})
    return out


def test_nonfinite_steps_are_skipped_then_stop_with_a_checkpoint(warm_model, tmp_path):
    out = tmp_path / "run"
    proc = torchrun(["configs/grpo.yaml", *fast_overrides(warm_model, out, **{
        "training.steps": 5, "training.max_nonfinite_steps": 1,
        "algorithm.kl_estimator": "k2",
        "model.ref_path": _nan_reference(warm_model, tmp_path / "ref")})],
        timeout=420, check=False)
    assert proc.returncode != 0
    assert "2 consecutive steps (up to step 1) had a non-finite gradient" in proc.stderr
    assert "training.max_nonfinite_steps=1" in proc.stderr
    records = read_metrics(out)
    # The first skipped step is logged and training goes on; the second stops the run.
    assert [r["step"] for r in records] == [0, 1]
    assert all(r["skipped"] > 0 and r["loss"] == "nan" for r in records)
    saved = out / "checkpoints" / "step_000002"
    assert (saved / "meta.json").exists()
    state = torch.load(saved / "actor" / "rank_00000.pt", weights_only=True)
    assert all(torch.isfinite(t).all() for t in state["model"].values())


def _tree_digest(root):
    """Content and modification time of every file but the lock (which names its holder)."""
    import hashlib

    return {str(p.relative_to(root)): (hashlib.sha256(p.read_bytes()).hexdigest(),
                                       p.stat().st_mtime_ns)
            for p in sorted(root.rglob("*")) if p.is_file() and p.name != ".moerl.lock"}


def _verify_as(ckpt_root, step, rank):
    """CheckpointManager.verify as trainer rank ``rank`` of the layout the run used (TP=2/EP=2
    on 2 processes: configs/models/tiny_cpu.yaml)."""
    from types import SimpleNamespace

    from moerl.checkpoint import CheckpointManager

    layout = {"world": 2, "tp": 2, "ep": 2, "etp": 1}
    manager = CheckpointManager(ckpt_root, every=1, final_step=2,
                                layout=SimpleNamespace(rank=rank, **layout))
    return manager.verify(step)


def test_finished_rerun_changes_nothing_and_damaged_checkpoints_fall_back(warm_model, tmp_path):
    import shutil

    out = tmp_path / "run"
    args = ["configs/grpo.yaml", *fast_overrides(warm_model, out, **{
        "training.steps": 2, "training.checkpoint_every": 1, "training.eval_every": 1,
        "logging.tensorboard": "true"})]
    torchrun(args, timeout=420)
    assert [r["step"] for r in read_metrics(out)] == [0, 1, 2]  # 2: the final evaluation
    before = _tree_digest(out)
    rerun = torchrun(args, timeout=420)
    assert "already holds a finished run" in rerun.stderr
    assert _tree_digest(out) == before

    # Every kind of damage is named, with its file, by the rank that owns the shard.
    ckpts = out / "checkpoints"
    assert _verify_as(ckpts, 2, 0) is None and _verify_as(ckpts, 2, 1) is None
    pristine = tmp_path / "pristine"
    shutil.copytree(ckpts, pristine)
    shard = ckpts / "step_000002" / "actor" / "rank_00001.pt"
    damage = {
        "truncated": lambda: shard.write_bytes(shard.read_bytes()[:1000]),
        "empty": lambda: shard.write_bytes(b""),
        "copied from another step": lambda: shutil.copy(
            ckpts / "step_000001" / "actor" / "rank_00001.pt", shard),
        "broken meta": lambda: (shard.parent.parent / "meta.json").write_text("{\"step\": 2"),
    }
    expected = {"truncated": "does not match its checksum", "empty": "is empty",
                "copied from another step": "does not match its checksum",
                "broken meta": "meta.json is unreadable"}
    for kind, make in damage.items():
        shutil.rmtree(ckpts)
        shutil.copytree(pristine, ckpts)
        make()
        problem = _verify_as(ckpts, 2, 1)
        assert problem and expected[kind] in problem, (kind, problem)
        assert kind == "broken meta" or "rank_00001.pt" in problem
        if kind != "broken meta":
            assert _verify_as(ckpts, 2, 0) is None  # rank 0's own shard is intact

    # The last damage left in place (a shard from step 1 under step 2): the run resumes from the
    # intact step-1 checkpoint with a warning that names the file, and trains on to the end.
    shutil.rmtree(ckpts)
    shutil.copytree(pristine, ckpts)
    damage["copied from another step"]()
    resumed = torchrun([*args, "--set", "training.steps=3"], timeout=420)
    assert f"{shard} (" in resumed.stderr and "damaged and skipped" in resumed.stderr
    assert "resumed from step 1" in resumed.stderr
    assert [r["step"] for r in read_metrics(out)] == [0, 1, 2, 3]
    assert _verify_as(ckpts, 3, 1) is None


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
