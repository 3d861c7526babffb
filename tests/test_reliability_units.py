"""Reliability pieces that need no training run: telemetry through non-finite steps and
finished runs, the checkpoint format's integrity checks, the out_dir lock, the launcher-death
hook and the launcher's pre-flight checks."""

from __future__ import annotations

import hashlib
import json

import pytest

from moerl.telemetry import Telemetry


def _telemetry(out_dir, *, start_step, total_steps=3, tensorboard=False):
    return Telemetry(out_dir, total_steps=total_steps, start_step=start_step,
                     tensorboard=tensorboard, progress=False, enabled=True)


def test_telemetry_logs_a_nonfinite_step_and_goes_on(tmp_path, capsys):
    tele = _telemetry(tmp_path, start_step=0)
    tele.log(0, {"loss": float("nan"), "grad_norm": float("inf"), "score/mean": 0.5})
    tele.log(1, {"loss": 0.25, "grad_norm": 1.5, "score/mean": 0.75})
    tele.close()
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert records[0] == {"step": 0, "loss": "nan", "grad_norm": "inf", "score/mean": 0.5}
    assert records[1]["loss"] == 0.25
    assert "grad_norm=inf" in capsys.readouterr().out


def _digest(root):
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


def test_rerun_of_a_finished_run_changes_no_record(tmp_path):
    tele = _telemetry(tmp_path, start_step=0, total_steps=2, tensorboard=True)
    for step, value in ((0, 0.1), (1, 0.2), (2, 0.3)):  # step 2: the final evaluation
        tele.log(step, {"eval/accuracy": value})
    tele.close()
    before = _digest(tmp_path)
    again = _telemetry(tmp_path, start_step=2, total_steps=2, tensorboard=True)
    again.log(2, {"eval/accuracy": 0.3})
    again.close()
    assert _digest(tmp_path) == before
    # A resume before the end still drops the records it is about to write again.
    _telemetry(tmp_path, start_step=1, total_steps=2).close()
    steps = [json.loads(x)["step"] for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert steps == [0]


# ------------------------------------------------------------------ config values that
# silently changed meaning (issue 11, item 6)

@pytest.mark.parametrize("override, message", [
    ("algorithm.kl_coef=nan", "algorithm.kl_coef='nan' is not a finite number"),
    ("algorithm.kl_coef=.nan", "algorithm.kl_coef=nan is not a finite number"),
    ("algorithm.kl_coef=-0.1", "algorithm.kl_coef=-0.1 must be >= 0"),
    ("algorithm.entropy_coef=inf", "algorithm.entropy_coef='inf' is not a finite number"),
    ("rollout.temperature=nan", "rollout.temperature='nan' is not a finite number"),
    ("rollout.timeout_s=-5", "rollout.timeout_s=-5.0 must be > 0"),
    ("rollout.max_retries=-1", "rollout.max_retries=-1 must be >= 0"),
    ("rollout.concurrency=0", "rollout.concurrency=0 must be >= 1"),
    ("weight_sync.master_port=70000", "weight_sync.master_port=70000 must be <= 65535"),
    ("training.lr=0", "training.lr=0.0 must be > 0"),
    ("training.adam_beta2=1", "training.adam_beta2=1.0 must be < 1"),
])
def test_values_that_would_change_meaning_are_rejected(override, message):
    from moerl.config import ConfigError, load_config

    with pytest.raises(ConfigError) as err:
        load_config([], [override])
    assert message in str(err.value)


def test_external_url_port_out_of_range_is_rejected():
    from moerl.config import ConfigError, load_config

    with pytest.raises(ConfigError, match=r"rollout.url='http://h:70000' is not a valid URL"):
        load_config([], ["rollout.server=external", "rollout.url=http://h:70000"])


def test_zero_retries_means_one_attempt(tmp_path):
    from moerl.rollout.protocol import MoeLayout
    from moerl.rollout_manager import RolloutManager, SamplingSettings

    manager = RolloutManager(
        builtin=False, url="http://127.0.0.1:9", api_key="", engine_dtype="float32",
        concurrency=1, timeout_s=1.0, max_retries=0, seed=0,
        sampling=SamplingSettings(temperature=1.0, top_p=1.0, top_k=-1, min_p=0.0,
                                  max_new_tokens=4, stop_token_ids=(0,)),
        layout=MoeLayout(num_hidden_layers=1, moe_layers=(0,), num_experts=2, top_k=1,
                         vocab_size=8),
        return_routes=False, require_routes=False, return_mask=False, require_mask=False,
        sync_method="disk", bucket_mb=1, sync_address="", sync_port=0, run_dir=tmp_path,
        hf_config_dir=str(tmp_path))
    assert manager.retry.max_attempts == 1


def test_a_scalar_section_does_not_swallow_later_overrides(tmp_path):
    from moerl.config import ConfigError, load_config

    path = tmp_path / "c.yaml"
    path.write_text("training: 5\n")
    with pytest.raises(ConfigError, match=r"training is a mapping in one source and 5"):
        load_config([path], ["training.steps=3"])
    path.write_text("training:\n")  # an empty section, then a key under it
    with pytest.raises(ConfigError, match=r"training is a mapping in one source and None"):
        load_config([path], ["training.steps=3"])


def test_duplicate_yaml_keys_are_rejected(tmp_path):
    from moerl.config import ConfigError, load_config

    path = tmp_path / "c.yaml"
    path.write_text("training:\n  lr: 1.0e-4\n  steps: 3\n  lr: 1.0\n")
    with pytest.raises(ConfigError, match=r"duplicate key 'lr' at line 4 of .*c.yaml"):
        load_config([path])


# ------------------------------------------------------------------ the launcher's pre-flight
# checks (issue 11, item 5): nothing starts when the launch cannot work

def _local_sh(*args, env=None):
    import os
    import subprocess

    from e2e_util import REPO

    return subprocess.run(["launch/local.sh", "configs/grpo.yaml", *args], cwd=REPO,
                          capture_output=True, text=True, timeout=600,
                          env={**os.environ, "OMP_NUM_THREADS": "1", **(env or {})})


def test_launcher_rejects_an_unknown_flag_before_any_worker(tmp_path):
    proc = _local_sh("--set", f"training.out_dir={tmp_path / 'run'}", "--keep-routng")
    assert proc.returncode == 2
    assert "unrecognized arguments: --keep-routng" in proc.stderr
    assert "torch.distributed" not in proc.stderr  # said by the launcher, not by workers
    assert not (tmp_path / "run").exists()


def test_launcher_checks_model_world_and_checkpoint_before_any_worker(model_dir, tmp_path):
    out = tmp_path / "run"
    meta = out / "checkpoints" / "step_000004" / "meta.json"
    meta.parent.mkdir(parents=True)
    meta.write_text(json.dumps({"format": 2, "step": 4, "shards": [{}, {}],
                                "layout": {"world": 2, "tp": 2, "ep": 2, "etp": 1}}))
    before = sorted(p.name for p in out.rglob("*"))
    proc = _local_sh("--set", f"model.hf_path={model_dir}", "--set", f"training.out_dir={out}",
                     "--set", "parallel.tp=3", "--set", "rollout.max_new_tokens=512",
                     env={"NPROC": "4"})
    assert proc.returncode == 2, proc.stderr
    for message in ("parallel.tp=3 does not divide num_attention_heads=4",
                    "rollout.max_new_tokens=512 leaves no room for a prompt",
                    "4 processes do not fit parallel.tp=3",
                    "step_000004 was written with layout {'world': 2, 'tp': 2, 'ep': 2, "
                    "'etp': 1}, this launch is {'world': 4, 'tp': 3"):
        assert message in proc.stderr
    assert "torch.distributed" not in proc.stderr  # no worker started
    assert sorted(p.name for p in out.rglob("*")) == before


# ------------------------------------------------------------------ one run per out_dir, and
# no worker outliving its launcher (issue 11, item 2)

_HOLD = """
import sys, time
from moerl.run_guard import OutDirLock
lock = OutDirLock(sys.argv[1])
print("held", flush=True)
time.sleep(600)
"""


def test_out_dir_lock_names_its_holder_and_a_dead_holder_releases_it(tmp_path):
    import os
    import signal
    import socket
    import subprocess
    import sys

    from moerl.config import ConfigError
    from moerl.run_guard import OutDirLock, is_locked

    holder = subprocess.Popen([sys.executable, "-c", _HOLD, str(tmp_path)], stdout=subprocess.PIPE,
                              text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(ConfigError) as err:
            OutDirLock(tmp_path)
        message = str(err.value)
        assert f"pid {holder.pid} on host {socket.gethostname()}" in message
        assert "training.out_dir" in message and f"pid {holder.pid}" in is_locked(tmp_path)
    finally:
        os.kill(holder.pid, signal.SIGKILL)  # a crash: no clean-up runs
        holder.wait()
    assert is_locked(tmp_path) is None
    lock = OutDirLock(tmp_path)  # the dead run's lock is taken over
    assert json.loads((tmp_path / ".moerl.lock").read_text())["pid"] == os.getpid()
    lock.release()


_PARENT = """
import subprocess, sys, time
child = subprocess.Popen([sys.executable, "-c",
    "from moerl.run_guard import exit_with_launcher; import time; exit_with_launcher(); "
    "print('armed', flush=True); time.sleep(600)"], stdout=sys.stdout, start_new_session=True)
time.sleep(600)
"""


def test_a_worker_exits_when_its_launcher_is_killed(tmp_path):
    import os
    import signal
    import subprocess
    import sys
    import time

    parent = subprocess.Popen([sys.executable, "-c", _PARENT], stdout=subprocess.PIPE, text=True)
    assert parent.stdout.readline().strip() == "armed"
    out = subprocess.run(["ps", "-o", "pid=", "--ppid", str(parent.pid)], capture_output=True,
                         text=True).stdout.split()
    assert len(out) == 1
    child = int(out[0])
    os.kill(parent.pid, signal.SIGKILL)  # the child is in a session of its own, like torchrun's
    parent.wait()
    deadline = time.monotonic() + 60
    while _alive(child) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not _alive(child), "the worker outlived its launcher"


def _alive(pid: int) -> bool:
    import subprocess

    state = subprocess.run(["ps", "-o", "stat=", "-p", str(pid)], capture_output=True,
                           text=True).stdout.strip()
    return bool(state) and not state.startswith("Z")


def test_the_trainer_itself_refuses_a_budget_beyond_the_context(model_dir, tmp_path):
    import subprocess
    import sys

    from e2e_util import REPO

    proc = subprocess.run(
        [sys.executable, "-m", "moerl.train", "configs/grpo.yaml", "--set",
         f"model.hf_path={model_dir}", "--set", f"training.out_dir={tmp_path / 'run'}",
         "--set", "rollout.max_new_tokens=600"],
        cwd=REPO, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 2
    assert "rollout.max_new_tokens=600 leaves no room for a prompt" in proc.stderr
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("status, refused", [(400, True), (404, True), (429, False),
                                             (500, False), (503, False), (None, False)])
def test_a_weight_push_fails_on_a_refusal_and_drops_a_failing_or_overloaded_server(status,
                                                                                    refused):
    """weight_sync: a 4xx is the server refusing the update (the push fails, naming it); a 5xx,
    a lost connection (no status) or a 429 that outlasted the client's retries is a server
    failing, dropped from the push while the others take the update."""
    from moerl.rollout.client import RolloutError
    from moerl.rollout.weight_sync import _refused

    assert _refused(RolloutError("x", status=status)) is refused
