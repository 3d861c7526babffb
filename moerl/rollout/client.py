"""Async client for SGLang's native API (moerl's built-in server or an SGLang 0.5.23 server).

``RolloutClient.generate`` sends one ``/generate`` request per prompt group (``n`` samples of one
prompt), at most ``concurrency`` in flight, and returns ``list[moerl.batch.Sample]`` ordered by
``(group_index, sample_index)``. Robustness:

- A group is retried as a whole (fresh server-side request ids) on connection errors, timeouts,
  HTTP 5xx/429, and outputs aborted without an error status (e.g. ``pause_generation(abort)``),
  with exponential backoff and jitter. A group's samples are recorded only from one complete,
  validated response, so a retry can neither lose nor duplicate a sample, even if the server
  was killed and restarted mid-batch.
- HTTP 4xx and malformed responses (:class:`moerl.rollout.protocol.WireFormatError`) are not
  retried: they are bugs or bad requests and raise with the server's message.

A group is sent as one batch request of ``n`` copies of the prompt, one sample each, never with
SGLang's ``sampling_params.n``: SGLang gives every copy of an ``n`` request the same seed, and
answers ``n > 1`` with ``return_sampling_mask`` with HTTP 500. With a ``seed``, each sample gets
its own ``sampling_seed`` (derived from ``seed``, group and sample index). Behind a load
balancer (SMG, ``moerl.rollout.router``), which takes one ``sampling_params`` object per request,
``request_per_sample=True`` sends each sample as its own request instead; the group is still
recorded only once all its samples have arrived, and retried as a whole. SGLang honours
``sampling_seed`` only when started with ``--enable-deterministic-inference`` (GPU only); without
it seeded samples are not reproducible, while exactly-once delivery still holds.

Route and mask validation needs the model's :class:`MoeLayout`: pass ``layout`` (for SGLang,
``MoeLayout.from_hf_config(model_dir)``), or leave it ``None`` and the client reads it from the
built-in server's ``/model_info`` (SGLang's does not report it, so that raises a ``ValueError``
saying what to pass). ``wire_format="auto"`` uses moerl's compact route/mask encodings when the
server advertises them, ``"sglang"`` never does.

Control endpoints (pause/continue, flush, weight updates) are coroutines too; synchronous code
(the trainer) runs any of them with :func:`run_sync`, and ``generate_sync`` wraps ``generate``.
Weight-update calls are never retried: a repeated broadcast would desynchronise the group.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import hashlib
import json
import random
from dataclasses import dataclass
from typing import Any, Awaitable, Callable, Mapping, Sequence, TypeVar

import aiohttp

from moerl.batch import Sample
from moerl.rollout.protocol import (
    SGLANG_SAMPLING_PARAM_FIELDS,
    MoeLayout,
    WireFormatError,
    decode_generate_output,
)

T = TypeVar("T")
RETRYABLE_STATUS = frozenset({429, 500, 502, 503, 504})


class RolloutError(RuntimeError):
    """A rollout server request failed (bad request, or still failing after all retries)."""

    def __init__(self, message: str, *, status: int | None = None):
        super().__init__(message)
        self.status = status


@dataclass(frozen=True)
class RetryPolicy:
    """Exponential backoff: attempt ``i`` (0-based) waits ``min(max, initial * multiplier**i)``
    seconds, scaled by a random factor in ``[1 - jitter, 1 + jitter]``."""

    max_attempts: int = 8
    initial_backoff_s: float = 0.25
    max_backoff_s: float = 8.0
    multiplier: float = 2.0
    jitter: float = 0.2

    def __post_init__(self):
        if self.max_attempts < 1:
            raise ValueError(f"RetryPolicy.max_attempts={self.max_attempts}: at least one "
                             f"attempt is needed")

    def backoff_s(self, attempt: int) -> float:
        base = min(self.max_backoff_s, self.initial_backoff_s * self.multiplier ** attempt)
        return base * random.uniform(1 - self.jitter, 1 + self.jitter)


def run_sync(coro: Awaitable[T]) -> T:
    """Run a client coroutine from synchronous code (in a helper thread if a loop is running)."""
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return asyncio.run(coro)
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        return pool.submit(asyncio.run, coro).result()


def derive_seed(seed: int, group_index: int, sample_index: int) -> int:
    """A stable 63-bit per-sample seed."""
    digest = hashlib.blake2b(f"{seed}:{group_index}:{sample_index}".encode(), digest_size=8)
    return int.from_bytes(digest.digest(), "little") >> 1


class _Retryable(Exception):
    pass


class RolloutClient:
    """Client of one rollout server (see the module docstring)."""

    def __init__(self, base_url: str, *, api_key: str | None = None, concurrency: int = 32,
                 timeout_s: float = 600.0, retry: RetryPolicy = RetryPolicy(),
                 layout: MoeLayout | None = None, wire_format: str = "auto",
                 server_ready: Callable[[], Awaitable[None]] | None = None,
                 request_per_sample: bool = False):
        if wire_format not in ("auto", "sglang", "compact"):
            raise ValueError(f"wire_format must be auto, sglang or compact, got {wire_format!r}")
        if concurrency < 1:
            raise ValueError("concurrency must be >= 1")
        self.base_url = base_url.rstrip("/")
        self.api_key = api_key
        self.concurrency = concurrency
        self.timeout_s = timeout_s
        self.retry = retry
        self.layout = layout
        self.wire_format = wire_format
        # Awaited before each retry of a group: a manager that is restarting the server makes
        # retries wait for it instead of spending their attempts on a server still starting.
        self.server_ready = server_ready
        # A load balancer in front (SMG) takes one sampling_params object per request, not
        # SGLang's per-item list: send each sample of a group as its own request.
        self.request_per_sample = request_per_sample
        self._server_info: dict | None = None

    # ------------------------------------------------------------------ HTTP plumbing

    def _session(self) -> aiohttp.ClientSession:
        headers = {"Authorization": f"Bearer {self.api_key}"} if self.api_key else {}
        return aiohttp.ClientSession(headers=headers,
                                     timeout=aiohttp.ClientTimeout(total=self.timeout_s))

    async def _request(self, session: aiohttp.ClientSession, method: str, path: str,
                       body: Any = None) -> tuple[int, Any]:
        async with session.request(method, self.base_url + path,
                                   data=None if body is None else json.dumps(body),
                                   headers={"Content-Type": "application/json"}) as resp:
            raw = await resp.read()
            try:
                payload = json.loads(raw) if raw else None
            except ValueError:
                payload = raw.decode(errors="replace")
            return resp.status, payload

    @staticmethod
    def _error_message(payload: Any) -> str:
        if isinstance(payload, dict):
            err = payload.get("error", payload)
            if isinstance(err, dict):
                return str(err.get("message", err))
            return str(err)
        return str(payload)[:2000]

    async def _call(self, method: str, path: str, body: Any = None, *, retry: bool) -> Any:
        """One control/info request; retried only if ``retry`` (idempotent endpoints)."""
        attempts = self.retry.max_attempts if retry else 1
        last: Exception | None = None
        async with self._session() as session:
            for attempt in range(attempts):
                try:
                    status, payload = await self._request(session, method, path, body)
                    if status == 200:
                        return payload
                    if status not in RETRYABLE_STATUS:
                        raise RolloutError(f"{path}: HTTP {status}: {self._error_message(payload)}",
                                           status=status)
                    last = RolloutError(f"{path}: HTTP {status}: {self._error_message(payload)}",
                                        status=status)
                except (aiohttp.ClientConnectionError, asyncio.TimeoutError) as e:
                    last = e
                if attempt + 1 < attempts:
                    await asyncio.sleep(self.retry.backoff_s(attempt))
        raise RolloutError(f"{path} failed after {attempts} attempt(s): {last}") from last

    # ------------------------------------------------------------------ info

    async def health(self) -> bool:
        """True if ``/health`` answers 200 (one attempt, no retries)."""
        try:
            async with self._session() as session:
                async with session.get(self.base_url + "/health") as resp:
                    return resp.status == 200
        except (aiohttp.ClientError, asyncio.TimeoutError):
            return False

    async def model_info(self) -> dict:
        try:
            info = await self._call("GET", "/model_info", retry=True)
        except RolloutError as err:
            if err.status != 404:
                raise
            # SMG answers only the older name, from one of its workers.
            info = await self._call("GET", "/get_model_info", retry=True)
        self._server_info = info
        return info

    async def server_info(self) -> dict:
        """SGLang's ``/server_info`` (its resolved launch settings)."""
        return await self._call("GET", "/server_info", retry=True)

    async def weight_version(self) -> str:
        return str((await self.model_info()).get("weight_version"))

    async def get_layout(self) -> MoeLayout:
        """The MoE layout: the one given (checked against a built-in server's), or the server's."""
        info = self._server_info or await self.model_info()
        served = info.get("moerl", {}).get("layout") if isinstance(info, dict) else None
        if served is not None:
            served = MoeLayout.from_json(served)
            if self.layout is not None and self.layout != served:
                raise ValueError(f"layout mismatch: client {self.layout} vs server {served}")
            self.layout = served
        if self.layout is None:
            raise ValueError("this server does not report its MoE layout (an SGLang server): pass "
                             "layout=MoeLayout.from_hf_config(<model dir or config>)")
        return self.layout

    async def _compact(self) -> bool:
        if self.wire_format == "sglang":
            return False
        info = self._server_info or await self.model_info()
        offered = bool(isinstance(info, dict) and info.get("moerl", {}).get("compact_encodings"))
        if self.wire_format == "compact" and not offered:
            raise ValueError("wire_format='compact' but the server offers no moerl encodings")
        return offered

    # ------------------------------------------------------------------ generate

    async def generate(self, prompts: Sequence[Sequence[int]], *, n: int = 1,
                       sampling_params: Mapping[str, Any] | None = None,
                       return_routes: bool = True, return_sampling_mask: bool = True,
                       seed: int | None = None, group_index_offset: int = 0) -> list[Sample]:
        """Generate ``n`` samples for each prompt; returns them ordered by (group, sample).

        ``sampling_params`` uses SGLang's keys (``temperature``, ``top_p``, ``top_k``, ``min_p``,
        ``max_new_tokens``, ``stop_token_ids``, ...); ``n`` and ``sampling_seed`` are set here.
        """
        sp = dict(sampling_params or {})
        for key in sp:
            if key not in SGLANG_SAMPLING_PARAM_FIELDS or key in ("n", "sampling_seed"):
                raise ValueError(f"sampling_params key {key!r} is not allowed here: use SGLang's "
                                 f"keys, and the n=/seed= arguments for n and sampling_seed")
        if n < 1:
            raise ValueError("n must be >= 1")
        layout = await self.get_layout() if (return_routes or return_sampling_mask) else None
        compact = await self._compact()
        semaphore = asyncio.Semaphore(self.concurrency)
        async with self._session() as session:
            groups = await asyncio.gather(*[
                self._generate_group(session, semaphore, group_index_offset + g, list(prompt),
                                     n=n, sp=sp, seed=seed, layout=layout, compact=compact,
                                     return_routes=return_routes,
                                     return_mask=return_sampling_mask)
                for g, prompt in enumerate(prompts)])
        return [s for group in groups for s in group]

    def generate_sync(self, prompts: Sequence[Sequence[int]], **kwargs: Any) -> list[Sample]:
        """``generate`` for synchronous callers (the trainer)."""
        return run_sync(self.generate(prompts, **kwargs))

    def _group_bodies(self, prompt: list[int], *, group_index: int, n: int, sp: dict,
                      seed: int | None, compact: bool, return_routes: bool,
                      return_mask: bool) -> list[dict]:
        # Never SGLang's n: it gives every copy the same seed, and n > 1 with
        # return_sampling_mask answers HTTP 500 in SGLang 0.5.23 (its parallel-sampling warm-up
        # copies the request with max_new_tokens=0). A batch of n one-sample requests instead,
        # or n requests of one sample each (request_per_sample).
        params = [{**sp, "n": 1} if seed is None else
                  {**sp, "n": 1, "sampling_seed": derive_seed(seed, group_index, j)}
                  for j in range(n)]
        if n == 1 or self.request_per_sample:
            bodies = [{"input_ids": prompt, "sampling_params": p} for p in params]
        else:
            bodies = [{"input_ids": [prompt] * n, "sampling_params": params}]
        for body in bodies:
            body.update(return_logprob=True, return_routed_experts=return_routes,
                        return_sampling_mask=return_mask)
            if compact:
                body["moerl_compact"] = True
        return bodies

    async def _post_group(self, session: aiohttp.ClientSession, semaphore: asyncio.Semaphore,
                          bodies: list[dict]) -> tuple[int, Any]:
        """POST a group's bodies; the first failed answer, or 200 and the outputs."""
        async def post(body: dict) -> tuple[int, Any]:
            async with semaphore:
                return await self._request(session, "POST", "/generate", body)

        if len(bodies) == 1:
            return await post(bodies[0])
        answers = await asyncio.gather(*[post(body) for body in bodies])
        failed = [answer for answer in answers if answer[0] != 200]
        return failed[0] if failed else (200, [payload for _, payload in answers])

    async def _generate_group(self, session: aiohttp.ClientSession, semaphore: asyncio.Semaphore,
                              group_index: int, prompt: list[int], *, n: int, sp: dict,
                              seed: int | None, layout: MoeLayout | None, compact: bool,
                              return_routes: bool, return_mask: bool) -> list[Sample]:
        bodies = self._group_bodies(prompt, group_index=group_index, n=n, sp=sp, seed=seed,
                                    compact=compact, return_routes=return_routes,
                                    return_mask=return_mask)
        last: Exception | None = None
        for attempt in range(self.retry.max_attempts):
            try:
                status, payload = await self._post_group(session, semaphore, bodies)
                return self._group_samples(status, payload, group_index, prompt, n=n,
                                           layout=layout, return_routes=return_routes,
                                           return_mask=return_mask)
            except (aiohttp.ClientConnectionError, asyncio.TimeoutError, _Retryable) as e:
                last = e
            if attempt + 1 < self.retry.max_attempts:
                await asyncio.sleep(self.retry.backoff_s(attempt))
                if self.server_ready is not None:
                    await self.server_ready()
        raise RolloutError(f"group {group_index}: /generate failed after "
                           f"{self.retry.max_attempts} attempts: {last!r}") from last

    def _group_samples(self, status: int, payload: Any, group_index: int, prompt: list[int], *,
                       n: int, layout: MoeLayout | None, return_routes: bool,
                       return_mask: bool) -> list[Sample]:
        if status in RETRYABLE_STATUS:
            raise _Retryable(f"HTTP {status}: {self._error_message(payload)}")
        if status != 200:
            raise RolloutError(f"/generate: HTTP {status}: {self._error_message(payload)}",
                               status=status)
        outs = payload if isinstance(payload, list) else [payload]
        if len(outs) != n:
            raise WireFormatError(f"expected {n} outputs for group {group_index}, got {len(outs)}")
        decoded = [decode_generate_output(out, prompt_len=len(prompt), layout=layout,
                                          want_routes=return_routes, want_mask=return_mask)
                   for out in outs]
        aborted = [d for d in decoded if d.finish_reason == "abort"]
        if aborted:  # e.g. pause_generation(abort): regenerate the whole group
            raise _Retryable(f"aborted: {aborted[0].finish_detail.get('message')}")
        return [Sample(
            group_index=group_index, sample_index=j, prompt_ids=list(prompt),
            response_ids=d.response_ids,
            rollout_logprobs_R=d.sampling_logprobs_R if return_mask else d.full_logprobs_R,
            full_logprobs_R=d.full_logprobs_R, finish_reason=d.finish_reason,
            weight_version=d.weight_version, routes_TLK=d.routes_TLK,
            mask_ids_M=d.mask_ids_M, mask_offsets_R1=d.mask_offsets_R1,
            extra={"weight_versions": d.weight_versions})
            for j, d in enumerate(decoded)]

    # ------------------------------------------------------------------ control

    async def flush_cache(self) -> bool:
        """True if the server flushed its cache (False: requests were running)."""
        try:
            await self._call("POST", "/flush_cache", retry=True)
            return True
        except RolloutError as e:
            if e.status == 400:
                return False
            raise

    async def pause_generation(self, mode: str = "retract") -> dict:
        return await self._call("POST", "/pause_generation", {"mode": mode}, retry=True)

    async def continue_generation(self) -> dict:
        return await self._call("POST", "/continue_generation", {}, retry=True)

    async def update_weight_version(self, new_version: str, *,
                                    abort_all_requests: bool = False) -> dict:
        return await self._call("POST", "/update_weight_version", {
            "new_version": new_version, "abort_all_requests": abort_all_requests}, retry=False)

    async def update_weights_from_disk(self, model_path: str, *, weight_version: str | None = None,
                                       flush_cache: bool = True) -> dict:
        return await self._call("POST", "/update_weights_from_disk", {
            "model_path": model_path, "weight_version": weight_version,
            "flush_cache": flush_cache}, retry=False)

    async def init_weights_update_group(self, *, master_address: str, master_port: int,
                                        rank_offset: int, world_size: int,
                                        group_name: str = "weight_update_group",
                                        backend: str = "nccl") -> dict:
        return await self._call("POST", "/init_weights_update_group", {
            "master_address": master_address, "master_port": master_port,
            "rank_offset": rank_offset, "world_size": world_size, "group_name": group_name,
            "backend": backend}, retry=False)

    async def destroy_weights_update_group(self, *,
                                           group_name: str = "weight_update_group") -> dict:
        return await self._call("POST", "/destroy_weights_update_group",
                                {"group_name": group_name}, retry=False)

    async def begin_weight_update(self) -> dict:
        return await self._call("POST", "/begin_weight_update", {}, retry=False)

    async def end_weight_update(self) -> dict:
        return await self._call("POST", "/end_weight_update", {}, retry=False)

    async def update_weights_from_distributed(self, *, names: list[str], dtypes: list[str],
                                              shapes: list[list[int]],
                                              group_name: str = "weight_update_group",
                                              weight_version: str | None = None,
                                              load_format: str | None = None,
                                              flush_cache: bool = True) -> dict:
        return await self._call("POST", "/update_weights_from_distributed", {
            "names": names, "dtypes": dtypes, "shapes": shapes, "group_name": group_name,
            "weight_version": weight_version, "load_format": load_format,
            "flush_cache": flush_cache}, retry=False)
