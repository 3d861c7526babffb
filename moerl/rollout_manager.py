"""Trainer rank 0's side of the rollout: the server's lifecycle, generation, weight pushes.

With ``rollout.server=builtin`` the manager starts moerl's server as a subprocess, with
``rollout.server=sglang`` a local SGLang server (``launch/sglang_server.sh`` through
``moerl.rollout.sglang_local``), and restarts it if it dies: a restarted server loads the last
weights that were pushed (kept on disk in the run directory for exactly that), under the same
weight version, so requests the client retries after the restart are served by the same policy
and no sample is lost or changes meaning. Either server exits with the trainer. With an
external server, restarts are the operator's; the client's retries ride them out, and a server
that comes back with other weights is caught by the weight-version check. Against any SGLang
server the start-up refuses a checkpoint SGLang would serve wrongly and says whether per-sample
seeds are honoured (``moerl.rollout.sglang``).

Sampling seeds are a function of ``(rollout.seed, step, group, sample)``, so a resumed run asks
for exactly the samples an uninterrupted one would have; the built-in server honours them, SGLang
only with ``--enable-deterministic-inference`` (GPU), and ``seeds_honoured`` says which holds.
"""

from __future__ import annotations

import asyncio
import logging
import secrets
import socket
import threading
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import torch

from moerl.batch import Sample
from moerl.rollout.client import RetryPolicy, RolloutClient, RolloutError, run_sync
from moerl.rollout.protocol import MoeLayout, WireFormatError
from moerl.rollout.server import ServerHandle, launch_server
from moerl.rollout.sglang import (SEEDS_IGNORED_WARNING, check_model_servable, is_sglang,
                                  seeds_honoured)
from moerl.rollout.sglang_local import SGLangServer, launch_sglang
from moerl.rollout.weight_sync import DistributedWeightSync, WeightSyncError
from moerl.hf_io import write_hf_checkpoint
from moerl.rollout.weight_sync import update_weights_from_disk

log = logging.getLogger("moerl.rollout")

# What a run loses when the server cannot return an optional extra.
_WITHOUT = {
    "routes": "routing-agreement telemetry is off",
    "mask": "rollout_logprobs are full-vocabulary log-probs, so the mismatch telemetry, OPSM and "
            "TIS do not see the sampler's truncation",
}


@dataclass(frozen=True)
class SamplingSettings:
    temperature: float
    top_p: float
    top_k: int
    min_p: float
    max_new_tokens: int
    stop_token_ids: tuple[int, ...]

    def params(self, *, greedy: bool = False) -> dict:
        if greedy:
            return {"temperature": 0.0, "max_new_tokens": self.max_new_tokens,
                    "stop_token_ids": list(self.stop_token_ids)}
        return {"temperature": self.temperature, "top_p": self.top_p, "top_k": self.top_k,
                "min_p": self.min_p, "max_new_tokens": self.max_new_tokens,
                "stop_token_ids": list(self.stop_token_ids)}


class RolloutManager:
    def __init__(self, *, builtin: bool, url: str, api_key: str, engine_dtype: str,
                 concurrency: int, timeout_s: float, max_retries: int, seed: int,
                 sampling: SamplingSettings, layout: MoeLayout, return_routes: bool,
                 require_routes: bool, return_mask: bool, require_mask: bool, sync_method: str,
                 bucket_mb: int, sync_address: str, sync_port: int, run_dir: Path,
                 hf_config_dir: str, max_batch_size: int = 64, local_sglang: bool = False):
        self.builtin, self.url, self.api_key = builtin, url, api_key or None
        self.local_sglang = local_sglang
        self.managed = builtin or local_sglang  # the manager starts and restarts the server
        self.engine_dtype, self.seed, self.sampling = engine_dtype, seed, sampling
        self.layout, self.return_routes, self.return_mask = layout, return_routes, return_mask
        self.require_routes, self.require_mask = require_routes, require_mask
        self.sync_method, self.bucket_bytes = sync_method, bucket_mb << 20
        self.sync_address = sync_address or ("127.0.0.1" if self.managed else socket.getfqdn())
        self.sync_port = sync_port
        self.weights_dir = run_dir / "rollout_weights"  # the last pushed weights, HF format
        self.hf_config_dir = hf_config_dir
        self.concurrency, self.timeout_s = concurrency, timeout_s
        self.retry = RetryPolicy(max_attempts=max_retries + 1)  # the first try, then retries
        self.max_batch_size = max_batch_size
        self.server: ServerHandle | SGLangServer | None = None
        self._serving = threading.Event()  # cleared while the server is being restarted
        self._serving.set()
        self.seeds_honoured = True  # False: an SGLang server without deterministic inference
        self.client: RolloutClient | None = None
        self._sync: DistributedWeightSync | None = None
        self.version = ""
        self.restarts = 0

    # ------------------------------------------------------------------ lifecycle

    def start(self, weights_dir: str | Path, version: str) -> None:
        """Start the built-in or a local SGLang server on ``weights_dir`` as ``version``, or
        connect to an external one (whose own version stands until the trainer's first push)."""
        self.version = version
        if self.managed:
            self._launch(weights_dir, port=0)
        self.client = RolloutClient(self.url, api_key=self.api_key, concurrency=self.concurrency,
                                    timeout_s=self.timeout_s, retry=self.retry,
                                    layout=self.layout, server_ready=self._wait_serving)
        try:
            if not self.managed:
                self.version = run_sync(self.client.weight_version())  # replaced by the push
            self._check_sglang()
            self._probe()
        except BaseException:
            self.close()
            raise

    def _check_sglang(self) -> None:
        """Against SGLang: refuse a checkpoint it serves wrongly; say whether seeds hold."""
        info = run_sync(self.client.model_info())
        if not is_sglang(info):
            return
        check_model_servable(info, self.layout)
        self.seeds_honoured = seeds_honoured(run_sync(self.client.server_info()))
        if not self.seeds_honoured:
            log.warning(SEEDS_IGNORED_WARNING)

    def _probe(self) -> None:
        """Short requests before any training work: a server that cannot return what the run
        needs fails the run now, with the client's explanation. Extras only wanted for telemetry
        (routes without keep-routing, masks without keep-sampling-mask) are switched off with a
        warning instead."""
        self._probe_once(routes=False, mask=False)  # reachable and generating at all
        for want in ("routes", "mask"):
            if not getattr(self, f"return_{want}"):
                continue
            try:
                self._probe_once(routes=want == "routes", mask=want == "mask")
            except (RolloutError, WireFormatError) as err:
                if getattr(self, f"require_{want}"):
                    raise RuntimeError(f"the rollout server cannot serve this run: {err}") from err
                log.warning("the rollout server does not return %s (%s): continuing without "
                            "them; %s", want, err, _WITHOUT[want])
                setattr(self, f"return_{want}", False)

    def _probe_once(self, *, routes: bool, mask: bool) -> None:
        run_sync(self.client.generate(
            [[0, 1]], n=1, sampling_params={**self.sampling.params(), "max_new_tokens": 1},
            return_routes=routes, return_sampling_mask=mask))

    def _launch(self, weights_dir: str | Path, *, port: int) -> None:
        log_path = self.weights_dir.parent / "rollout_server.log"
        if self.local_sglang:
            self.api_key = self.api_key or secrets.token_hex(16)
            self.server = launch_sglang(weights_dir, port=port, dtype=self.engine_dtype,
                                        api_key=self.api_key, weight_version=self.version,
                                        log_path=log_path)
            self.url = self.server.url
            if self.client is not None:
                self.client.base_url = self.url
            return
        self.server = launch_server(
            weights_dir, port=port, api_key=self.api_key or "auto", dtype=self.engine_dtype,
            seed=self.seed, max_batch_size=self.max_batch_size,
            extra_args=("--weight-version", self.version), num_threads=1,
            log_path=log_path)
        self.api_key, self.url = self.server.api_key, self.server.url
        if self.client is not None:
            self.client.base_url = self.url

    def close(self) -> None:
        if self._sync is not None:
            self._sync.close()
            self._sync = None
        if self.server is not None:
            self.server.stop()
            self.server = None

    # ------------------------------------------------------------------ generation

    def generate(self, prompt_ids: list[list[int]], *, n: int, step: int, group_offset: int = 0,
                 greedy: bool = False) -> list[Sample]:
        """``n`` samples per prompt from the current policy; restarts a dead builtin server."""
        params = self.sampling.params(greedy=greedy)
        coro = self.client.generate(
            prompt_ids, n=n, sampling_params=params, seed=None if greedy else hash_seed(
                self.seed, step), return_routes=self.return_routes and not greedy,
            return_sampling_mask=self.return_mask and not greedy,
            group_index_offset=group_offset)
        return self.run(coro)

    def run(self, coro) -> list[Sample]:
        """The samples of ``coro`` (a generation over ``self.client``, e.g. a custom rollout),
        under the dead-server watchdog and the weight-version check."""
        samples = run_sync(self._with_watchdog(coro))
        stale = {s.weight_version for s in samples} - {self.version}
        if stale:
            raise RuntimeError(f"rollout server answered with weight version(s) {sorted(stale)}, "
                               f"expected {self.version!r}: it is serving other weights")
        return samples

    async def _with_watchdog(self, coro):
        """Run ``coro``; meanwhile, if the server this manager started dies, restart it on its
        port with the last pushed weights so the client's retries land on the same policy."""
        task = asyncio.ensure_future(coro)
        while not task.done():
            await asyncio.wait([task], timeout=0.5)
            if self.managed and self.server.process.poll() is not None:
                self.restarts += 1
                log.warning("rollout server died (exit %s); restarting it on port %d with "
                            "weights %s (restart #%d)", self.server.process.returncode,
                            self.server.port, self.version, self.restarts)
                await asyncio.to_thread(self._restart)
        return task.result()

    def _restart(self) -> None:
        if self._sync is not None:
            self._sync.broken = True  # the server side of the group died with the process
        weights = self.weights_dir if (self.weights_dir / "config.json").exists() else (
            self.hf_config_dir)
        self._serving.clear()
        try:
            self._launch(weights, port=self.server.port)
        finally:
            self._serving.set()

    async def _wait_serving(self) -> None:
        if not self._serving.is_set():
            await asyncio.to_thread(self._serving.wait)

    # ------------------------------------------------------------------ weights

    def push_weights(self, named_tensors: Iterable[tuple[str, torch.Tensor]],
                     version: str) -> None:
        """Send the trainer's weights (HF names) and make ``version`` current on the server.

        For a server this manager started the tensors are written to ``weights_dir`` first: that
        copy is what a restarted server loads, so a server that dies during the push is simply
        restarted with the new weights.
        """
        if self.sync_method == "disk":
            update_weights_from_disk([self.client], named_tensors, out_dir=self.weights_dir,
                                     weight_version=version, config_dir=self.hf_config_dir)
        else:
            if self.managed:
                named_tensors = [(name, t.detach().cpu().clone()) for name, t in named_tensors]
                write_hf_checkpoint(named_tensors, self.weights_dir,
                                    config_dir=self.hf_config_dir)
            try:
                self._push_distributed(named_tensors, version)
            except (RolloutError, WeightSyncError, OSError):
                if not (self.managed and self.server.process.poll() is not None):
                    raise
                self.restarts += 1
                log.warning("rollout server died during the weight push; restarting it with "
                            "the new weights %s (restart #%d)", version, self.restarts)
                self.version = version
                self._restart()
        served = run_sync(self.client.weight_version())
        if served != version:
            raise RuntimeError(f"after the weight push the server reports version {served!r}, "
                               f"expected {version!r}")
        self.version = version

    def _push_distributed(self, named_tensors, version: str) -> None:
        if self._sync is None or self._sync.broken:
            if self._sync is not None:
                self._sync.close()
            self._sync = DistributedWeightSync([self.client], master_address=self.sync_address,
                                               master_port=self.sync_port)
            self._sync.init()
        self._sync.push(named_tensors, weight_version=version, bucket_bytes=self.bucket_bytes)


def hash_seed(seed: int, step: int) -> int:
    """The rollout seed of one RL step (the client derives per-sample seeds from it)."""
    return (seed * 1_000_003 + step) % (2**31 - 1)
