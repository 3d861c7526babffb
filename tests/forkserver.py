"""A fork server for the test suite's torchrun launches: ``torchrun --standalone`` semantics without
paying for torch, megatron-core, transformers and moerl's imports in every worker of every run.

Most of the suite's time went to start-up: a 2-step TP=2/EP=2 run costs ~45 CPU-seconds, of which
its steps take ~3. This server imports those modules once, then forks each job from itself.

Per job (one request on its Unix socket) it forks a *supervisor* in a session of its own, which
forks ``nproc`` workers with torchrun's worker variables (``RANK``, ``LOCAL_RANK``,
``WORLD_SIZE``, ``MASTER_ADDR``/``MASTER_PORT`` of a free port, ``TORCHELASTIC_RUN_ID``, ...) and
runs the module or script as ``__main__`` in each. As torchrun does, the supervisor stops the other
workers when one fails (SIGTERM, then SIGKILL after a grace period) and answers exit status 1; 0
when every worker exits 0. Workers write to the job's stdout/stderr files (one shared pair, as the
workers of torchrun share its pipes).

Each worker is a fresh fork of a process that has only imported modules (no computation ran in it,
one OpenMP thread): no state passes from one job to the next.

Use ``tests/e2e_util.run``: it sends ``python -m torch.distributed.run --standalone ...`` commands
here unless ``MOERL_TEST_LAUNCHER=torchrun``, which runs every one of them under real torchrun.
"""

from __future__ import annotations

import ctypes
import json
import os
import signal
import socket
import sys
import time
import traceback

_PR_SET_PDEATHSIG = 1
GRACE_S = 30.0  # torchrun's own grace between SIGTERM and SIGKILL of the remaining workers

# Imported once, here, before any fork. A module a job never uses costs nothing at fork.
PRELOAD = (
    "torch", "torch.distributed", "numpy", "safetensors.torch", "yaml", "aiohttp",
    "transformers", "transformers.models.qwen3_moe.modeling_qwen3_moe",
    "transformers.models.qwen2_moe.modeling_qwen2_moe", "transformers.models.olmoe.modeling_olmoe",
    "transformers.models.deepseek_v3.modeling_deepseek_v3",
    "transformers.models.glm4_moe.modeling_glm4_moe",
    "transformers.models.qwen3.modeling_qwen3",
)


def _die_with_parent(sig: int = signal.SIGTERM) -> None:
    ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, int(sig), 0, 0, 0)


def preload() -> None:
    import importlib
    import pkgutil

    for name in PRELOAD:
        try:
            importlib.import_module(name)
        except Exception:  # noqa: BLE001 - an optional module; the job imports what it needs
            pass
    from moerl.trainer.megatron_version import import_megatron

    import_megatron()
    import moerl

    for info in pkgutil.walk_packages(moerl.__path__, "moerl."):
        try:
            importlib.import_module(info.name)
        except Exception:  # noqa: BLE001 - e.g. a module that needs SGLang or a GPU
            pass


def _python_path(value: str | None) -> list[str]:
    return [os.path.abspath(p) for p in (value or "").split(os.pathsep) if p]


_SERVER_PYTHONPATH = _python_path(os.environ.get("PYTHONPATH"))
_SERVER_WARNOPTIONS = list(sys.warnoptions)


def _start_up_environment(env: dict, first: str) -> None:
    """What a new interpreter takes from its environment at start-up: ``sys.path`` (the script's
    folder or the working directory, then ``PYTHONPATH``) and the ``PYTHONWARNINGS`` filters."""
    import warnings

    rest = [p for p in sys.path[1:] if p not in _SERVER_PYTHONPATH]
    sys.path[:] = [first, *_python_path(env.get("PYTHONPATH")), *rest]
    options = [o for o in env.get("PYTHONWARNINGS", "").split(",") if o]
    if options != _SERVER_WARNOPTIONS:
        sys.warnoptions[:] = options
        warnings._processoptions(options)


def _worker(job: dict, rank: int, port: int) -> None:
    """In a forked worker: become ``torchrun``'s worker ``rank`` of ``job`` and run it."""
    code = 1
    try:
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        signal.signal(signal.SIGINT, signal.SIG_DFL)
        signal.signal(signal.SIGCHLD, signal.SIG_DFL)
        out = os.open(job["stdout"], os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        err = os.open(job["stderr"], os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        os.dup2(out, 1)
        os.dup2(err, 2)
        os.close(out)
        os.close(err)
        devnull = os.open(os.devnull, os.O_RDONLY)
        os.dup2(devnull, 0)
        os.close(devnull)
        n = job["nproc"]
        env = dict(job["env"])
        env.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(n),
                   LOCAL_WORLD_SIZE=str(n), GROUP_RANK="0", GROUP_WORLD_SIZE="1",
                   ROLE_RANK=str(rank), ROLE_WORLD_SIZE=str(n), ROLE_NAME="default",
                   MASTER_ADDR="localhost", MASTER_PORT=str(port),
                   TORCHELASTIC_RUN_ID=job["run_id"], TORCHELASTIC_RESTART_COUNT="0",
                   TORCHELASTIC_MAX_RESTARTS="0")
        os.environ.clear()
        os.environ.update(env)
        os.chdir(job["cwd"])
        import runpy

        target, args = job["target"], job["args"]
        first = job["cwd"] if job["module"] else os.path.dirname(os.path.abspath(target))
        _start_up_environment(env, first)
        sys.argv = [target, *args]
        if job["module"]:
            # As under ``python -m``: the module runs as __main__, not as the preloaded copy.
            sys.modules.pop(target, None)
            runpy.run_module(target, run_name="__main__", alter_sys=True)
        else:
            runpy.run_path(target, run_name="__main__")
        code = 0
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
        if e.code is not None and not isinstance(e.code, int):
            print(e.code, file=sys.stderr)
    except BaseException:  # noqa: BLE001 - reported like an uncaught exception, exit 1
        traceback.print_exc()
        code = 1
    finally:
        try:
            import atexit

            atexit._run_exitfuncs()
        except BaseException:  # noqa: BLE001
            traceback.print_exc()
        try:
            sys.stdout.flush()
            sys.stderr.flush()
        finally:
            os._exit(code)


def _supervise(job: dict, conn: socket.socket) -> None:
    """In a forked supervisor: run the job's workers, answer ``{"returncode": ...}``."""
    os.setsid()
    _die_with_parent()
    conn.sendall((json.dumps({"pgid": os.getpid()}) + "\n").encode())
    from moerl.rollout.sglang_local import free_port  # preloaded

    port = free_port()
    workers: dict[int, int] = {}
    for rank in range(job["nproc"]):
        pid = os.fork()
        if pid == 0:
            conn.close()
            _worker(job, rank, port)
        workers[pid] = rank

    def stop(*_):
        for pid in list(workers):
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        os._exit(1)

    signal.signal(signal.SIGTERM, stop)
    failures = []
    deadline = None
    while workers:
        if deadline is None:
            pid, status = os.waitpid(-1, 0)
        else:
            pid, status = os.waitpid(-1, os.WNOHANG)
            if pid == 0:
                if time.monotonic() > deadline:
                    for other in workers:
                        os.kill(other, signal.SIGKILL)
                    deadline = float("inf")
                time.sleep(0.05)
                continue
        if pid not in workers:
            continue
        rank = workers.pop(pid)
        code = os.waitstatus_to_exitcode(status)
        if code != 0:
            failures.append({"rank": rank, "exitcode": code})
            if deadline is None:  # the first failure: stop the rest, as torchrun does
                for other in workers:
                    os.kill(other, signal.SIGTERM)
                deadline = time.monotonic() + GRACE_S
    if failures:
        with open(job["stderr"], "a") as f:
            first = failures[0]
            f.write(f"moerl test fork server: worker rank {first['rank']} failed with exit code "
                    f"{first['exitcode']} (torchrun would raise ChildFailedError and exit 1); "
                    f"all failures: {failures}\n")
    conn.sendall((json.dumps({"returncode": 1 if failures else 0}) + "\n").encode())
    conn.close()


def serve(path: str) -> None:
    _die_with_parent()
    signal.signal(signal.SIGCHLD, signal.SIG_IGN)  # supervisors are reaped by the kernel
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(path)
    listener.listen(16)
    print("ready", flush=True)
    while True:
        conn, _ = listener.accept()
        data = b""
        while not data.endswith(b"\n"):
            chunk = conn.recv(65536)
            if not chunk:
                break
            data += chunk
        if not data.endswith(b"\n"):
            conn.close()
            continue
        job = json.loads(data)
        pid = os.fork()
        if pid == 0:
            listener.close()
            signal.signal(signal.SIGCHLD, signal.SIG_DFL)
            try:
                _supervise(job, conn)
            finally:
                os._exit(0)
        conn.close()


if __name__ == "__main__":
    import warnings

    os.environ["OMP_NUM_THREADS"] = "1"
    with warnings.catch_warnings():  # not into pytest's output, once per session
        warnings.simplefilter("ignore")
        preload()
    serve(sys.argv[1])
