"""Generation through SMG (SGLang's router) with two built-in servers as its workers: the same
routes, masks and tokens as one server answering directly; the trainer's manager behind the
router (worker list checked, weights pushed to both workers directly); a worker killed mid-step
loses no sample.

SMG is an optional extra (``pip install 'moerl[router]'``); it is found as ``$MOERL_SMG`` (a
command, e.g. ``env PYTHONPATH=/opt/smg python -m smg``), ``.venv-smg/bin/smg`` in the checkout
(``python3 -m venv .venv-smg && .venv-smg/bin/pip install smg==1.13.0``), an ``smg`` on PATH or
an importable ``smg`` package, and the tests that need it are skipped without it. With ``$MOERL_SGLANG_ROUTER``
(a command starting sglang-router 0.3.2) one more test shows that router refused.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shlex
import shutil
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

import pytest
import torch

from moerl.rollout.client import RetryPolicy, RolloutClient, run_sync
from moerl.rollout.protocol import MoeLayout
from moerl.rollout.router import RouterError
from moerl.rollout.server import launch_server
from moerl.rollout_manager import RolloutManager, SamplingSettings

N, GROUPS, MAX_NEW = 3, 6, 5
SAMPLING = {"temperature": 1.0, "top_k": 8, "max_new_tokens": MAX_NEW}
API_KEY = "router-test"


REPO = Path(__file__).resolve().parents[1]


def smg_command() -> list[str] | None:
    if os.environ.get("MOERL_SMG"):
        return shlex.split(os.environ["MOERL_SMG"])
    if (REPO / ".venv-smg" / "bin" / "smg").exists():  # its own venv: pip install smg there
        return [str(REPO / ".venv-smg" / "bin" / "smg")]
    if shutil.which("smg"):
        return [shutil.which("smg")]
    if importlib.util.find_spec("smg") is not None:
        return [sys.executable, "-m", "smg"]
    return None


def sglang_router_command() -> list[str] | None:
    """sglang-router 0.3.2, the last release under that name (``$MOERL_SGLANG_ROUTER``, a
    command such as ``python -m sglang_router.launch_router``), for the refusal test."""
    return shlex.split(os.environ["MOERL_SGLANG_ROUTER"]) if os.environ.get(
        "MOERL_SGLANG_ROUTER") else None


needs_smg = pytest.mark.skipif(smg_command() is None,
                                reason="SMG is not installed (pip install 'moerl[router]')")
needs_sglang_router = pytest.mark.skipif(
    sglang_router_command() is None, reason="$MOERL_SGLANG_ROUTER (sglang-router 0.3.2) not set")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Router:
    """A router (``smg launch`` by default) in front of ``worker_urls``, round robin, quick to
    notice a dead worker."""

    def __init__(self, worker_urls: list[str], log_path, command: list[str] | None = None):
        self.port = _free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        command = command or [*smg_command(), "launch"]
        cmd = [*command, "--host", "127.0.0.1", "--port", str(self.port),
               "--worker-urls", *worker_urls, "--policy", "round_robin", "--api-key", API_KEY,
               "--prometheus-port", str(_free_port()), "--prometheus-host", "127.0.0.1",
               "--health-check-interval-secs", "1", "--health-failure-threshold", "1"]
        with open(log_path, "wb") as log:
            self.process = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT)
        self.log_path = log_path
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            assert self.process.poll() is None, log_path.read_text()[-3000:]
            try:
                with urllib.request.urlopen(self.url + "/health", timeout=2):
                    return
            except OSError:
                time.sleep(0.2)
        raise TimeoutError(f"SMG did not answer /health:\n{log_path.read_text()[-3000:]}")

    def stop(self) -> None:
        self.process.terminate()
        self.process.wait(30)


@pytest.fixture(scope="module")
def workers(model_dir):
    # One sequence at a time: each request's output is a pure function of weights, prompt, seed.
    handles = [launch_server(model_dir, num_threads=1, max_batch_size=1, api_key=API_KEY)
               for _ in range(2)]
    yield handles
    for handle in handles:
        handle.stop()


@pytest.fixture(scope="module")
def router(workers, tmp_path_factory):
    r = Router([h.url for h in workers], tmp_path_factory.mktemp("smg") / "smg.log")
    yield r
    r.stop()


@pytest.fixture(scope="module")
def layout(model_dir):
    return MoeLayout.from_hf_config(json.loads((model_dir / "config.json").read_text()))


def _prompts():
    gen = torch.Generator().manual_seed(5)
    return [torch.randint(1, 60, (3 + g % 3,), generator=gen).tolist() for g in range(GROUPS)]


def _generate(client: RolloutClient):
    return client.generate_sync(_prompts(), n=N, sampling_params=SAMPLING, seed=99,
                                group_index_offset=40)


def _key(samples):
    return [(s.group_index, s.sample_index, s.response_ids, s.rollout_logprobs_R.tolist(),
             s.routes_TLK.tolist(), s.mask_ids_M.tolist(), s.mask_offsets_R1.tolist())
            for s in samples]


def _finished(handle) -> int:
    req = urllib.request.Request(handle.url + "/model_info",
                                 headers={"Authorization": f"Bearer {API_KEY}"})
    with urllib.request.urlopen(req, timeout=10) as resp:
        return json.loads(resp.read())["moerl"]["num_finished"]


def _router_client(router, layout, **kwargs) -> RolloutClient:
    return RolloutClient(router.url, api_key=API_KEY, concurrency=4, layout=layout,
                         wire_format="sglang", request_per_sample=True, **kwargs)


@pytest.fixture(scope="module")
def single(workers, layout):
    direct = RolloutClient(workers[0].url, api_key=API_KEY, concurrency=4, layout=layout,
                           wire_format="sglang")
    return _key(_generate(direct))


@needs_smg
def test_through_smg_routes_and_masks_equal_one_server_answering_directly(
        router, workers, layout, single):
    before = [_finished(h) for h in workers]
    samples = _generate(_router_client(router, layout))
    assert _key(samples) == single  # tokens, log-probs, routes and masks, sample for sample
    served = [_finished(h) - b for h, b in zip(workers, before)]
    assert sum(served) == GROUPS * N and all(served), served  # both workers took samples


def _manager_kwargs(layout, model_dir, run_dir) -> dict:
    sampling = SamplingSettings(temperature=1.0, top_p=1.0, top_k=8, min_p=0.0,
                                max_new_tokens=MAX_NEW, stop_token_ids=())
    return dict(builtin=False, url="", api_key=API_KEY, engine_dtype="float32",
                concurrency=4, timeout_s=120, max_retries=2, seed=7, sampling=sampling,
                layout=layout, return_routes=True, require_routes=True, return_mask=True,
                require_mask=True, sync_method="distributed", bucket_mb=1,
                sync_address="127.0.0.1", sync_port=0, run_dir=run_dir,
                hf_config_dir=str(model_dir))


@needs_smg
def test_manager_behind_smg_pushes_to_every_worker_and_generates_through_it(
        router, workers, layout, model_dir, tmp_path):
    kwargs = _manager_kwargs(layout, model_dir, tmp_path)
    partial = RolloutManager(urls=(workers[0].url,), router_url=router.url, **kwargs)
    with pytest.raises(RouterError, match="launch the router with --worker-urls equal"):
        partial.start(model_dir, version="")  # the router serves a worker moerl would not push to
    manager = RolloutManager(urls=tuple(h.url for h in workers), router_url=router.url,
                             **kwargs)
    manager.start(model_dir, version="")
    try:
        assert [c.base_url for c in manager.generation_clients] == [router.url]
        from transformers import AutoModelForCausalLM

        model = AutoModelForCausalLM.from_pretrained(model_dir)
        manager.push_weights(list(model.state_dict().items()), version="step-1")
        samples = manager.generate(_prompts()[:2], n=2, step=1)
        assert {s.weight_version for s in samples} == {"step-1"}  # from both workers, checked
        assert all(s.routes_TLK is not None and s.mask_offsets_R1 is not None for s in samples)
    finally:
        manager.close()


@needs_smg
@needs_sglang_router
def test_a_router_that_drops_routes_and_masks_is_refused(workers, layout, model_dir, tmp_path):
    dropping = Router([h.url for h in workers], tmp_path / "sglang_router.log",
                      command=sglang_router_command())
    try:
        manager = RolloutManager(urls=tuple(h.url for h in workers), router_url=dropping.url,
                                 **_manager_kwargs(layout, model_dir, tmp_path))
        with pytest.raises(RouterError, match="does not carry .* meta_info has no routed_experts"):
            manager.start(model_dir, version="")
    finally:
        dropping.stop()


@needs_smg
def test_a_worker_killed_mid_step_behind_smg_loses_no_sample(router, workers, layout, single):
    """Runs second to last in this module: it kills a worker of the shared pair."""
    client = _router_client(router, layout,
                            retry=RetryPolicy(max_attempts=6, initial_backoff_s=0.2))
    before = [_finished(h) for h in workers]
    result = {}
    thread = threading.Thread(target=lambda: result.update(samples=_generate(client)))
    thread.start()
    deadline = time.monotonic() + 120
    while _finished(workers[1]) == before[1] and time.monotonic() < deadline:
        time.sleep(0.02)
    workers[1].kill()
    thread.join(timeout=300)
    assert not thread.is_alive()
    assert _key(result["samples"]) == single  # every sample exactly once, the same samples
    # The survivor served more than its round-robin half: it took over the dead worker's groups.
    assert _finished(workers[0]) - before[0] > GROUPS * N // 2


def test_router_config_needs_the_workers():
    from moerl.config import ConfigError, load_config

    with pytest.raises(ConfigError, match="router_url needs rollout.server=external"):
        load_config([], ["rollout.router_url=http://r:1"])


@needs_smg
def test_a_dead_worker_leaves_smg_and_rejoins_at_the_current_weights(
        router, workers, layout, model_dir, tmp_path, caplog):
    """Runs after the mid-step kill (which left worker 1 dead): relaunched on its port, then
    killed, relaunched and, with worker 0, killed for good."""
    from transformers import AutoModelForCausalLM

    from moerl.rollout.fleet import NoServerLeft
    from moerl.rollout.router import router_worker_urls

    def relaunch(i: int) -> None:
        if workers[i].process.poll() is None:
            return
        workers[i] = launch_server(model_dir, port=workers[i].port, num_threads=1,
                                   max_batch_size=1, api_key=API_KEY)

    relaunch(1)
    manager = RolloutManager(urls=tuple(h.url for h in workers), router_url=router.url,
                             **_manager_kwargs(layout, model_dir, tmp_path))
    manager.start(model_dir, version="")
    weights = list(AutoModelForCausalLM.from_pretrained(model_dir).state_dict().items())
    try:
        manager.push_weights(weights, version="step-1")
        workers[1].kill()
        manager.push_weights(weights, version="step-2")  # to the survivor only
        assert "removing the worker " + workers[1].url in caplog.text
        assert router_worker_urls(router.url, api_key=API_KEY) == {workers[0].url}
        before = _finished(workers[0])
        samples = manager.generate(_prompts()[:2], n=2, step=2)
        assert {s.weight_version for s in samples} == {"step-2"}
        assert _finished(workers[0]) - before == 4  # all on the survivor

        relaunch(1)  # a fresh server on the same URL, at the start-up weights (version "")
        manager.push_weights(weights, version="step-3")  # brought to step-3, then back in SMG
        assert router_worker_urls(router.url, api_key=API_KEY) == {h.url for h in workers}
        assert run_sync(manager.clients[1].weight_version()) == "step-3"
        before = _finished(workers[1])
        samples = manager.generate(_prompts()[:2], n=2, step=3)
        assert {s.weight_version for s in samples} == {"step-3"}
        assert _finished(workers[1]) > before  # round robin: the rejoined worker serves again

        for handle in workers:
            handle.kill()
        with pytest.raises(NoServerLeft, match="no rollout server is left: .*"
                           + workers[0].url + ".*/health.*" + workers[1].url):
            manager.generate(_prompts()[:1], n=1, step=4)
    finally:
        manager.close()
