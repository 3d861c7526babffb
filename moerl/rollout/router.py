"""A load balancer in front of the rollout servers: SMG (Shepherd Model Gateway), SGLang's router.

With ``rollout.router_url`` generation goes through the router and weight pushes go to every
server (``rollout.urls``) directly, over a weight-update group each, as for a fleet. Which routers
carry what an RL step needs, measured with two built-in servers behind each
(``tests/test_rollout_router.py``) and read in their sources:

- **SMG >= 1.13** (PyPI ``smg``, github smg-project/smg, ``pip install 'moerl[router]'``):
  forwards ``return_routed_experts``, ``routed_experts_start_len``, ``return_sampling_mask`` and
  ``sampling_logprobs_mode`` (its typed ``GenerateRequest`` keeps unknown top-level fields in a
  ``#[serde(flatten)] other`` map, ``crates/protocols/src/generate.rs``) and passes the worker's
  response through unchanged, so ``meta_info.routed_experts`` and the sampling mask arrive
  bit for bit. Two limits: ``sampling_params`` must be one object (SGLang's per-item list
  answers 422), so each sample of a group is its own request (``request_per_sample``), and
  float sampling parameters travel as f32 (what SGLang computes in anyway). A worker must
  answer ``/health``, ``/server_info`` (or ``/get_server_info``) and ``/v1/models`` to be
  registered (``detect_backend.rs``, ``discover_metadata.rs``).
- **sglang-router <= 0.3.2** (the last release under that name): drops
  ``return_routed_experts`` and ``return_sampling_mask`` (its typed request has no such fields
  and keeps no others), so responses come back without routes and masks. moerl finds that out
  with a probe request at start-up and refuses the router (:class:`RouterError`) instead of
  training without them.
"""

from __future__ import annotations

import json
import time
import urllib.error
import urllib.parse
import urllib.request


class RouterError(RuntimeError):
    """The router at ``rollout.router_url`` cannot serve this run; the message says why."""


def router_drops_message(router_url: str, err: Exception) -> str:
    return (f"the router at {router_url} does not carry what this run needs ({err}): the servers "
            f"behind it answer the same request directly, so the router drops the routes or "
            f"the sampling mask (sglang-router does: its typed request has no "
            f"return_routed_experts/return_sampling_mask). Use SMG >= 1.13 "
            f"(pip install 'moerl[router]'; smg launch --worker-urls ...), or drop "
            f"rollout.router_url and let moerl spread groups over rollout.urls itself")


def _call(url: str, api_key: str | None, timeout_s: float, *, method: str = "GET",
          body: dict | None = None) -> object:
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    data = None
    if body is not None:
        data, headers["Content-Type"] = json.dumps(body).encode(), "application/json"
    request = urllib.request.Request(url, data=data, headers=headers, method=method)
    with urllib.request.urlopen(request, timeout=timeout_s) as resp:
        raw = resp.read()
    return json.loads(raw) if raw.strip() else None


def router_workers(router_url: str, *, api_key: str | None = None,
                   timeout_s: float = 10.0) -> dict[str, str]:
    """The workers SMG lists at ``GET /workers``: URL -> SMG's worker id."""
    try:
        payload = _call(router_url.rstrip("/") + "/workers", api_key, timeout_s)
    except urllib.error.HTTPError as err:
        raise RouterError(f"the router at {router_url} answers GET /workers with HTTP "
                          f"{err.code}: moerl needs SMG's worker list to know that every "
                          f"worker gets the weight pushes (is it SMG >= 1.13?)") from err
    except (urllib.error.URLError, OSError, ValueError) as err:
        raise RouterError(f"the router at {router_url} does not answer GET /workers: "
                          f"{err}") from err
    workers = payload.get("workers") if isinstance(payload, dict) else None
    if not isinstance(workers, list):
        raise RouterError(f"the router at {router_url} answers GET /workers without a "
                          f"'workers' list: {str(payload)[:300]}")
    return {str(w.get("url", "")).rstrip("/"): str(w.get("id", ""))
            for w in workers if isinstance(w, dict)}


def router_worker_urls(router_url: str, *, api_key: str | None = None,
                       timeout_s: float = 10.0) -> set[str]:
    """The worker URLs SMG lists at ``GET /workers``."""
    return set(router_workers(router_url, api_key=api_key, timeout_s=timeout_s))


def _change_workers(router_url: str, what: str, api_key: str | None, timeout_s: float,
                    **call) -> None:
    try:
        _call(router_url.rstrip("/") + "/workers" + call.pop("path", ""), api_key, timeout_s,
              **call)
    except (urllib.error.URLError, OSError, ValueError) as err:
        raise RouterError(f"the router at {router_url} refused to {what}: {err} (moerl "
                          f"manages SMG's workers through its /workers API; launch SMG with "
                          f"the same --api-key as the workers)") from err


def remove_router_worker(router_url: str, url: str, *, api_key: str | None = None,
                         timeout_s: float = 30.0) -> None:
    """Take ``url`` out of SMG's workers (``DELETE /workers/{id}``), so that no request goes
    to it; returns once SMG no longer lists it (SMG removes in the background)."""
    url = url.rstrip("/")
    deadline = time.monotonic() + timeout_s
    while (worker_id := router_workers(router_url, api_key=api_key).get(url)) is not None:
        if time.monotonic() > deadline:
            raise RouterError(f"the router at {router_url} still lists the worker {url} "
                              f"{timeout_s:.0f} s after moerl asked it to remove it")
        _change_workers(router_url, f"remove the worker {url}", api_key, timeout_s,
                        method="DELETE", path="/" + urllib.parse.quote(worker_id, safe=""))
        time.sleep(0.2)


def add_router_worker(router_url: str, url: str, *, api_key: str | None = None,
                      timeout_s: float = 60.0) -> None:
    """Give ``url`` back to SMG (``POST /workers``, with the workers' API key); returns once
    SMG lists it (SMG registers in the background)."""
    url = url.rstrip("/")
    _change_workers(router_url, f"add the worker {url}", api_key, timeout_s, method="POST",
                    body={"url": url, **({"api_key": api_key} if api_key else {})})
    deadline = time.monotonic() + timeout_s
    while url not in router_workers(router_url, api_key=api_key):
        if time.monotonic() > deadline:
            raise RouterError(f"the router at {router_url} did not list the worker {url} "
                              f"{timeout_s:.0f} s after moerl added it (see SMG's log)")
        time.sleep(0.2)


def check_router_workers(router_url: str, urls: list[str], *, api_key: str | None = None,
                         timeout_s: float = 60.0) -> None:
    """Wait until the router lists exactly ``urls`` as its workers; raise otherwise.

    A worker the router serves but moerl does not push to would answer at old weights; a worker
    moerl pushes to but the router does not know only wastes the push. SMG registers workers in
    the background after it starts, hence the wait.
    """
    want = {u.rstrip("/") for u in urls}
    deadline = time.monotonic() + timeout_s
    while True:
        listed = router_worker_urls(router_url, api_key=api_key)
        if listed == want:
            return
        if not listed <= want or time.monotonic() > deadline:  # not just still registering
            raise RouterError(
                f"the router at {router_url} lists the workers {sorted(listed)}, but "
                f"rollout.urls (the servers moerl pushes weights to) is {sorted(want)}: launch "
                f"the router with --worker-urls equal to rollout.urls")
        time.sleep(0.5)
