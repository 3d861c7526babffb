"""Generation over several rollout servers: one group per request, least outstanding work first.

A group (the ``n`` samples of one prompt) is the unit of placement: all its samples come from one
server, in one request, so a group is recorded only from one complete response. Each group goes
to the live server with the least outstanding work, counted as tokens in flight (prompt plus
``n * max_new_tokens`` for every group placed there and not yet answered); ties go to the lower
index, so placement is deterministic for a given order of completions.

Which server serves a group does not change its samples: per-sample seeds are a function of the
rollout seed, the group index and the sample index only (``client.derive_seed``), so a fleet run
asks for exactly the samples a single-server run does.

Faults: when a server fails a group for a reason that is the server's and not the request's
(connections refused or cut, timeouts, 5xx: what the client has already retried), the server is
marked down, ``on_down(index)`` is told (the manager restarts a built-in server or warns about an
external one), and the group is placed on another live server. A bad request (HTTP 4xx) or a
malformed answer raises at once. When no server is left the generation fails with a message that
names every server and why it went down.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Sequence
from typing import Any, Mapping

from moerl.batch import Sample
from moerl.rollout.client import RolloutClient, RolloutError

log = logging.getLogger("moerl.rollout")


class NoServerLeft(RuntimeError):
    """Every server of the fleet is down. ``dropped``: when raised by a weight push, the
    servers it dropped (index -> why)."""

    def __init__(self, message: str, *, dropped: Mapping[int, str] | None = None):
        super().__init__(message)
        self.dropped = dict(dropped or {})


class Fleet:
    """Several :class:`RolloutClient` s (one per server) as one generator."""

    def __init__(self, clients: Sequence[RolloutClient], *,
                 on_down: Callable[[int, str], None] | None = None):
        if not clients:
            raise ValueError("a fleet needs at least one server")
        self.clients = list(clients)
        self.on_down = on_down
        self.up = [True] * len(self.clients)
        self.outstanding = [0] * len(self.clients)  # tokens in flight per server
        self.groups_served = [0] * len(self.clients)
        self.down_reasons: dict[int, str] = {}

    def mark_up(self, index: int) -> None:
        """Server ``index`` is back (restarted, or healthy again and at the current weights)."""
        self.up[index] = True
        self.down_reasons.pop(index, None)

    def live(self) -> list[int]:
        """The servers that are up; raises :class:`NoServerLeft` (naming every server and why
        it went down) when there is none."""
        live = [i for i, up in enumerate(self.up) if up]
        if not live:
            reasons = "; ".join(f"{self.clients[i].base_url}: {why}"
                                for i, why in sorted(self.down_reasons.items()))
            raise NoServerLeft(f"no rollout server is left: {reasons}")
        return live

    def _pick(self) -> int:
        return min(self.live(), key=lambda i: (self.outstanding[i], i))

    def mark_down(self, index: int, why: str) -> None:
        """Server ``index`` failed: no more groups go to it, ``on_down`` is told (once)."""
        if self.up[index]:
            self.up[index] = False
            self.down_reasons[index] = why
            log.warning("rollout server %s is down (%s); its groups go to the others",
                        self.clients[index].base_url, why)
            if self.on_down is not None:
                self.on_down(index, why)

    async def generate(self, prompts: Sequence[Sequence[int]], *, n: int,
                       sampling_params: Mapping[str, Any], max_new_tokens: int,
                       group_index_offset: int = 0, **kwargs: Any) -> list[Sample]:
        """``n`` samples per prompt, ordered by (group, sample); ``kwargs`` go to
        :meth:`RolloutClient.generate` (seed, return_routes, return_sampling_mask)."""
        self._slots = [asyncio.Semaphore(c.concurrency) for c in self.clients]
        groups = await asyncio.gather(*[
            self._group(list(prompt), group_index_offset + g, n=n,
                        sampling_params=sampling_params,
                        work=len(prompt) + n * max_new_tokens, **kwargs)
            for g, prompt in enumerate(prompts)])
        return [s for group in groups for s in group]

    async def _group(self, prompt: list[int], group_index: int, *, work: int,
                     **kwargs: Any) -> list[Sample]:
        while True:
            index = self._pick()
            self.outstanding[index] += work
            try:
                async with self._slots[index]:
                    samples = await self.clients[index].generate(
                        [prompt], group_index_offset=group_index, **kwargs)
            except RolloutError as err:
                if err.status is not None and err.status < 500:
                    raise  # the request's fault: another server would refuse it too
                self.mark_down(index, str(err).splitlines()[0][:300])
                continue
            finally:
                self.outstanding[index] -= work
            self.groups_served[index] += 1
            return samples
