"""Trainer rank 0's side of the rollout: the servers' lifecycle, generation, weight pushes.

One server or a fleet: ``num_servers`` built-in servers on this machine, or the external servers
at ``urls``. Generation spreads groups over the servers by least outstanding work
(``moerl.rollout.fleet``); every weight push goes to all servers, each over a weight-update group
of its own (trainer rank 0 plus the server's ranks), and every server's weight version is
checked after it. A server that fails mid-step loses no sample: its groups go to the others; one
that fails during a weight push does not fail the push: the others take the whole update.
With ``router_url`` (external servers behind SMG, ``moerl.rollout.router``) generation goes
through the router instead, which places the requests and steps around a dead worker itself;
pushes, health and version checks still go to every server directly. Behind the router the same
drop/rejoin holds, with SMG's worker list kept equal to the servers at the current weights: a
worker that stops answering ``/health`` (checked before each generation and each push) is
dropped from the fleet and removed from SMG with a warning; once healthy again it rejoins with
the next weight push and is added back to SMG only after its version check passed.

With ``rollout.server=builtin`` the manager starts moerl's servers as subprocesses, with
``rollout.server=sglang`` local SGLang servers (``launch/sglang_server.sh`` through
``moerl.rollout.sglang_local``), and restarts one that dies: a restarted server loads the last
weights that were pushed (kept on disk in the run directory for exactly that), under the same
weight version, so requests the client retries after the restart are served by the same policy
and no sample is lost or changes meaning. Managed servers exit with the trainer. With external
servers, restarts are the operator's: the fleet drops a failed external server with a warning,
and takes it back with the next weight push (which brings it to the current weights) once it
answers ``/health`` again; a server that comes back with other weights is caught by the
weight-version check. Against any SGLang server the start-up refuses a checkpoint SGLang would
serve wrongly and says whether per-sample seeds are honoured (``moerl.rollout.sglang``).

Sampling seeds are a function of ``(rollout.seed, step, group, sample)``, so a resumed run asks
for exactly the samples an uninterrupted one would have; the built-in server honours them, SGLang
only with ``--enable-deterministic-inference`` (GPU), and ``seeds_honoured`` says which holds.
"""

from __future__ import annotations

import asyncio
import json
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
from moerl.rollout.fleet import Fleet, NoServerLeft
from moerl.rollout.protocol import MoeLayout, WireFormatError
from moerl.rollout.router import (RouterError, add_router_worker, check_router_workers,
                                  remove_router_worker, router_drops_message)
from moerl.rollout.launcher import ServerHandle, launch_server
from moerl.rollout.sglang import (SEEDS_IGNORED_WARNING, check_config_servable,
                                  check_model_servable, is_sglang, seeds_honoured)
from moerl.rollout.sglang_local import SGLangServer, launch_sglang
from moerl.rollout.weight_sync import DistributedWeightSync
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
                 hf_config_dir: str, max_batch_size: int = 64, num_servers: int = 1,
                 urls: tuple[str, ...] = (), local_sglang: bool = False,
                 router_url: str = ""):
        self.builtin, self.local_sglang, self.api_key = builtin, local_sglang, api_key or None
        self.managed = builtin or local_sglang  # the manager starts and restarts the servers
        self.urls = [] if self.managed else list(urls or (url,))
        self.num_servers = num_servers if self.managed else len(self.urls)
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
        self.servers: list[ServerHandle | SGLangServer] = []  # managed servers, one per client
        self._serving = threading.Event()  # cleared while a managed server is being restarted
        self._serving.set()
        self.seeds_honoured = True  # False: an SGLang server without deterministic inference
        self.clients: list[RolloutClient] = []
        self.fleet: Fleet | None = None  # the servers (workers): pushes, health, versions
        self.router_url = router_url  # SMG in front of the external servers: generation only
        self.generator: Fleet | None = None  # where generation goes: the fleet, or the router
        self._behind: set[int] = set()  # external servers down since a push: not at the weights
        self._sync: DistributedWeightSync | None = None  # a weight-update group per server
        self.version = ""
        self.restarts = 0

    # ------------------------------------------------------------------ lifecycle

    def start(self, weights_dir: str | Path, version: str) -> None:
        """Start the managed servers (built-in or local SGLang) on ``weights_dir`` as
        ``version``, or connect to external ones (whose own version stands until the trainer's
        first weight push)."""
        self.version = version
        if self.local_sglang:  # refused before a start-up is spent on it
            check_config_servable(json.loads((Path(weights_dir) / "config.json").read_text()),
                                  self.layout)
        try:
            if self.managed:
                for i in range(self.num_servers):
                    self.servers.append(self._launch(weights_dir, port=0, index=i))
                self.urls = [server.url for server in self.servers]
            self.clients = [RolloutClient(url, api_key=self.api_key, concurrency=self.concurrency,
                                          timeout_s=self.timeout_s, retry=self.retry,
                                          layout=self.layout, server_ready=self._wait_serving)
                            for url in self.urls]
            self.fleet = Fleet(self.clients, on_down=self._on_down)
            self.generator = self.fleet
            if not self.managed:
                # Replaced by the first push, which the trainer makes before any rollout.
                self.version = run_sync(self.clients[0].weight_version())
            for client in self.clients:
                self._check_sglang(client)
                self._probe(client)
            if self.router_url:
                self.generator = Fleet([self._router_client()])
        except BaseException:
            self.close()
            raise

    def start_in_background(self, weights_dir: str | Path, version: str) -> "Starting":
        """:meth:`start` in a thread of its own, so the caller can build its models meanwhile;
        :meth:`Starting.result` waits for it and raises its error."""
        return Starting(self, weights_dir, version)

    def _router_client(self) -> RolloutClient:
        """The client of the router (see ``moerl.rollout.router``), checked to list exactly the
        servers this manager pushes weights to and to carry routes and masks intact."""
        client = RolloutClient(self.router_url, api_key=self.api_key,
                               concurrency=self.concurrency, timeout_s=self.timeout_s,
                               retry=self.retry, layout=self.layout, wire_format="sglang",
                               request_per_sample=True)
        try:
            self._probe_once(client, routes=self.return_routes, mask=self.return_mask)
        except (RolloutError, WireFormatError) as err:
            raise RouterError(router_drops_message(self.router_url, err)) from err
        check_router_workers(self.router_url, self.urls, api_key=self.api_key)
        return client

    @property
    def generation_clients(self) -> list[RolloutClient]:
        """Where requests for samples go: the router's client, or the servers' clients."""
        return self.generator.clients

    def _check_sglang(self, client: RolloutClient) -> None:
        """Against SGLang: refuse a checkpoint it serves wrongly; say whether seeds hold."""
        info = run_sync(client.model_info())
        if not is_sglang(info):
            return
        check_model_servable(info, self.layout)
        if not seeds_honoured(run_sync(client.server_info())):
            if self.seeds_honoured:
                log.warning(SEEDS_IGNORED_WARNING)
            self.seeds_honoured = False

    def _probe(self, client: RolloutClient) -> None:
        """Short requests before any training work: a server that cannot return what the run
        needs fails the run now, with the client's explanation. Extras only wanted for telemetry
        (routes without keep-routing, masks without keep-sampling-mask) are switched off with a
        warning instead."""
        self._probe_once(client, routes=False, mask=False)  # reachable and generating at all
        for want in ("routes", "mask"):
            if not getattr(self, f"return_{want}"):
                continue
            try:
                self._probe_once(client, routes=want == "routes", mask=want == "mask")
            except (RolloutError, WireFormatError) as err:
                if getattr(self, f"require_{want}"):
                    raise RuntimeError(f"the rollout server cannot serve this run: {err}") from err
                log.warning("the rollout server does not return %s (%s): continuing without "
                            "them; %s", want, err, _WITHOUT[want])
                setattr(self, f"return_{want}", False)

    def _probe_once(self, client: RolloutClient, *, routes: bool, mask: bool) -> None:
        run_sync(client.generate(
            [[0, 1]], n=1, sampling_params={**self.sampling.params(), "max_new_tokens": 1},
            return_routes=routes, return_sampling_mask=mask))

    def _launch(self, weights_dir: str | Path, *, port: int,
                index: int) -> ServerHandle | SGLangServer:
        log_path = self.weights_dir.parent / (
            "rollout_server.log" if index == 0 else f"rollout_server_{index}.log")
        if self.local_sglang:
            self.api_key = self.api_key or secrets.token_hex(16)
            return launch_sglang(weights_dir, port=port, dtype=self.engine_dtype,
                                 api_key=self.api_key, weight_version=self.version,
                                 log_path=log_path)
        server = launch_server(
            weights_dir, port=port, api_key=self.api_key or "auto", dtype=self.engine_dtype,
            seed=self.seed, max_batch_size=self.max_batch_size,
            extra_args=("--weight-version", self.version), num_threads=1, log_path=log_path)
        self.api_key = server.api_key  # generated by the first, shared by the others
        return server

    def close(self) -> None:
        if self._sync is not None:
            self._sync.close()
            self._sync = None
        for server in self.servers:
            server.stop()
        self.servers = []

    # ------------------------------------------------------------------ generation

    def generate(self, prompt_ids: list[list[int]], *, n: int, step: int, group_offset: int = 0,
                 greedy: bool = False) -> list[Sample]:
        """``n`` samples per prompt from the current policy; restarts a dead builtin server."""
        params = self.sampling.params(greedy=greedy)
        coro = self.generator.generate(
            prompt_ids, n=n, sampling_params=params, max_new_tokens=params["max_new_tokens"],
            seed=None if greedy else hash_seed(self.seed, step),
            return_routes=self.return_routes and not greedy,
            return_sampling_mask=self.return_mask and not greedy,
            group_index_offset=group_offset)
        return self.run(coro)

    def run(self, coro) -> list[Sample]:
        """The samples of ``coro`` (a generation over the clients, e.g. a custom rollout), under
        the dead-server watchdog and the weight-version check."""
        try:
            self._drop_dead_workers()
        except BaseException:
            if asyncio.iscoroutine(coro):
                coro.close()  # never awaited: no "never awaited" warning
            raise
        samples = run_sync(self._with_watchdog(coro))
        stale = {s.weight_version for s in samples} - {self.version}
        if stale:
            raise RuntimeError(f"rollout server answered with weight version(s) {sorted(stale)}, "
                               f"expected {self.version!r}: it is serving other weights")
        return samples

    async def _with_watchdog(self, coro):
        """Run ``coro``; meanwhile, if a managed server process dies, restart it on its port
        with the last pushed weights so the retried groups land on the same policy."""
        task = asyncio.ensure_future(coro)
        while not task.done():
            await asyncio.wait([task], timeout=0.5)
            for i, server in enumerate(self.servers):
                if server.process.poll() is not None:
                    self.restarts += 1
                    log.warning("rollout server %d died (exit %s); restarting it on port %d with "
                                "weights %s (restart #%d)", i, server.process.returncode,
                                server.port, self.version, self.restarts)
                    await asyncio.to_thread(self._restart, i)
        return task.result()

    def _restart(self, index: int) -> None:
        """Relaunch managed server ``index`` on its port at the last pushed weights."""
        if self._sync is not None:
            self._sync.forget(index)  # the server side of its group died with the process
        self.servers[index].stop()  # a no-op unless it failed a push but still runs
        weights = self.weights_dir if (self.weights_dir / "config.json").exists() else (
            self.hf_config_dir)
        self._serving.clear()
        try:
            self.servers[index] = self._launch(weights, port=self.servers[index].port,
                                               index=index)
        finally:
            self._serving.set()
        self.fleet.mark_up(index)

    async def _wait_serving(self) -> None:
        if not self._serving.is_set():
            await asyncio.to_thread(self._serving.wait)

    def _on_down(self, index: int, why: str) -> None:
        """The fleet gave up on server ``index`` for this step (its groups went elsewhere)."""
        if self._sync is not None:
            self._sync.forget(index)  # a server that comes back is a new process: a new group
        if not self.managed:
            self._behind.add(index)  # back only through a weight push (see _members)
        if self.router_url:
            log.warning("removing the worker %s from the router at %s until it answers again "
                        "and has the current weights", self.clients[index].base_url,
                        self.router_url)
            remove_router_worker(self.router_url, self.clients[index].base_url,
                                 api_key=self.api_key)

    def _drop_dead_workers(self) -> None:
        """Behind the router the fleet sees no generation failures (SMG steps around a dead
        worker), so its workers' ``/health`` is asked instead: one that does not answer is
        dropped like a server that failed a group. Raises ``NoServerLeft`` when none is up."""
        if not self.router_url:
            return
        for i in self.fleet.live():
            if not run_sync(self.clients[i].health()):
                self.fleet.mark_down(i, "does not answer /health")
        self.fleet.live()

    def _members(self) -> list[int]:
        """Servers a weight push goes to: every managed one (a dead one is restarted); the
        external ones that are up, and those that were dropped but answer /health again."""
        if self.managed:
            return list(range(len(self.clients)))
        back = {i for i in self._behind if run_sync(self.clients[i].health())}
        for i in sorted(back):
            log.warning("rollout server %s answers again: it rejoins with this weight push",
                        self.clients[i].base_url)
        return [i for i in range(len(self.clients)) if self.fleet.up[i] or i in back]

    # ------------------------------------------------------------------ weights

    def push_weights(self, named_tensors: Iterable[tuple[str, torch.Tensor]],
                     version: str) -> None:
        """Send the trainer's weights (HF names) to every server and make ``version`` current.

        For managed servers the tensors are written to ``weights_dir`` first: that copy is what
        a restarted server loads, so a server that fails during the push is simply restarted
        with the new weights. An external server that fails during the push is dropped with a
        warning (the others take the whole update: each server has a weight-update group of its
        own) and rejoins with a later push once it answers ``/health`` again. With no server
        left, :class:`NoServerLeft`.
        """
        self._drop_dead_workers()
        members = self._members()
        if self.sync_method == "disk":
            update_weights_from_disk([self.clients[i] for i in members], named_tensors,
                                     out_dir=self.weights_dir, weight_version=version,
                                     config_dir=self.hf_config_dir)
        else:
            if self.managed:
                named_tensors = [(name, t.detach().cpu().clone()) for name, t in named_tensors]
                write_hf_checkpoint(named_tensors, self.weights_dir,
                                    config_dir=self.hf_config_dir)
            dropped = self._push_distributed(named_tensors, version, members)
            self._handle_dropped(dropped, version)
            members = [i for i in members if self.managed or i not in dropped]
        for i in members:
            client = self.clients[i]
            served = run_sync(client.weight_version())
            if served != version:
                raise RuntimeError(f"after the weight push the server {client.base_url} reports "
                                   f"version {served!r}, expected {version!r}")
            self.fleet.mark_up(i)
            if self.router_url and i in self._behind:
                add_router_worker(self.router_url, client.base_url, api_key=self.api_key)
                log.warning("the worker %s is back in the router at %s, at version %s",
                            client.base_url, self.router_url, version)
            self._behind.discard(i)
        self.version = version

    def _handle_dropped(self, dropped: dict[int, str], version: str) -> None:
        """Servers that failed during the push: a managed one is restarted on the new weights
        (on disk since before the push); an external one is marked down, with a warning, until a
        later push brings it back. Raises :class:`NoServerLeft` when no server is left."""
        if self.managed and dropped:
            self.version = version  # what a restarted server loads, under this version
        for i, why in sorted(dropped.items()):
            if self.managed:
                self.restarts += 1
                log.warning("rollout server %d failed during the weight push (%s); restarting "
                            "it with the new weights %s (restart #%d)", i, why, version,
                            self.restarts)
                self._restart(i)
            else:
                self.fleet.mark_down(i, f"failed during the weight push: {why}")
        self.fleet.live()

    def _push_distributed(self, named_tensors, version: str,
                          members: list[int]) -> dict[int, str]:
        """Push over the weight-update groups (one per server, joined on first use; all built
        afresh after a refused push); returns the servers the push dropped, with why."""
        if self._sync is None or self._sync.broken:
            if self._sync is not None:
                self._sync.close()
            self._sync = DistributedWeightSync(self.clients, master_address=self.sync_address,
                                               master_port=self.sync_port)
        try:
            stats = self._sync.push(named_tensors, weight_version=version,
                                    bucket_bytes=self.bucket_bytes, members=members)
        except NoServerLeft as err:
            return err.dropped
        return stats["dropped"]


def hash_seed(seed: int, step: int) -> int:
    """The rollout seed of one RL step (the client derives per-sample seeds from it)."""
    return (seed * 1_000_003 + step) % (2**31 - 1)


class Starting:
    """A :meth:`RolloutManager.start` running in a daemon thread (a daemon: an interrupted
    trainer exits without waiting out a start-up; the servers it started exit with it)."""

    def __init__(self, manager: RolloutManager, weights_dir: str | Path, version: str):
        self._manager = manager
        self._done = threading.Event()
        self._lock = threading.Lock()
        self._error: BaseException | None = None
        self._abandoned = False
        threading.Thread(target=self._run, args=(weights_dir, version), daemon=True,
                         name="moerl-rollout-start").start()

    def _run(self, weights_dir, version) -> None:
        try:
            self._manager.start(weights_dir, version)  # closes what it started if it fails
        except BaseException as err:  # noqa: BLE001 - handed to result()
            self._error = err
        with self._lock:
            self._done.set()
            close = self._abandoned and self._error is None
        if close:
            self._manager.close()

    def result(self) -> None:
        """Wait for the start-up; raise its error, if any."""
        self._done.wait()
        if self._error is not None:
            raise self._error

    def abandon(self) -> None:
        """The caller failed: close the servers, now or as soon as the start-up ends."""
        with self._lock:
            self._abandoned = True
            close = self._done.is_set() and self._error is None
        if close:
            self._manager.close()
