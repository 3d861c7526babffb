"""Custom rollouts: your own generation loop (multi-turn dialogue, tool calls, environments).

``rollout.generate = "package.module:function"`` names an async function, called once per sample
(``rollout.group_size`` times per prompt, concurrently)::

    async def my_rollout(prompt: moerl.tasks.Prompt, session: RolloutSession) -> dict | None:
        turn = await session.generate()                    # the policy continues session.tokens
        session.append(session.tokenizer.encode(feedback))  # environment / tool tokens
        turn = await session.generate(max_new_tokens=8)    # and so on
        return {"turns": 2}                                 # metadata for the reward (optional)

Each ``generate`` is one request to the rollout server on the whole conversation so far, and
returns a :class:`Turn`: the new token ids, their log-probs, the experts every layer routed the
call's positions to, and the sampler's kept set per token. The session assembles the trained
sample so that everything lines up with its tokens across turns (where other systems go wrong):

- tokens are the prompt, then every generated or appended token in order;
  ``response_ids = tokens[len(prompt):]``;
- the loss mask marks the tokens the policy sampled; rollout log-probs and sampling-mask rows are
  the generating call's there, and 0 / empty (never read: outside the loss) on environment tokens;
- route row ``t`` is the routing of position ``t`` from the first call whose forward covered it
  (the decode steps of the call that generated token ``t``; the next call's prefill for a turn's
  last token and for environment tokens). That is the routing held in the engine's KV cache for
  the position, which every later token's log-prob was computed with;
- environment tokens after the last policy turn are dropped from the trained sequence: they carry
  no loss and, under causal attention, change nothing before them.

All response tokens of a sample (policy and environment) share the ``rollout.max_new_tokens``
budget; ``generate`` asks for at most what is left and ``append`` beyond it raises ValueError.
Seeds are derived from ``(rollout seed, step, prompt, sample, turn)``, so resumed runs repeat.
"""

from __future__ import annotations

import asyncio
import inspect
from dataclasses import dataclass

import torch

from moerl.batch import Sample
from moerl.rewards import import_callable
from moerl.rollout.client import derive_seed
from moerl.tasks.base import Prompt, Tokenizer


@dataclass(frozen=True)
class Turn:
    """What one call to the server returned (shapes: R new tokens, L hidden layers, K top-k)."""

    ids: list[int]
    logprobs_R: torch.Tensor  # behaviour log-probs of the sampled tokens
    routes_TLK: torch.Tensor | None  # [len(context) + R - 1, L, K], SGLang's layout
    mask_ids_M: torch.Tensor | None  # the sampler's kept ids per token, CSR
    mask_offsets_R1: torch.Tensor | None
    finish_reason: str


class RolloutSession:
    """One sample's conversation with the policy (see the module docstring)."""

    def __init__(self, *, client, prompt_ids: list[int], tokenizer: Tokenizer,
                 sampling_params: dict, seed: int | None, group_index: int, sample_index: int,
                 max_new_tokens: int, return_routes: bool, return_mask: bool):
        self.tokenizer = tokenizer
        self.tokens = list(prompt_ids)
        self._client, self._params, self._seed = client, sampling_params, seed
        self._group, self._sample = group_index, sample_index
        self._prompt_len, self._budget = len(prompt_ids), max_new_tokens
        self._want = dict(return_routes=return_routes, return_sampling_mask=return_mask)
        self._policy: list[bool] = []
        self._logprobs: list[float] = []
        self._full_logprobs: list[float] = []
        self._mask_rows: list[torch.Tensor] = []
        self._route_chunks: list[torch.Tensor] = []
        self._routed = 0  # positions whose route row is recorded
        self._versions: list[str] = []
        self.turns = 0
        self.finish_reason = "stop"

    @property
    def group_index(self) -> int:
        """The prompt's index in the step's rollout batch."""
        return self._group

    @property
    def sample_index(self) -> int:
        """This sample's index in its prompt's group (0 .. group_size - 1)."""
        return self._sample

    @property
    def remaining(self) -> int:
        """Response tokens still allowed (rollout.max_new_tokens minus those so far)."""
        return self._budget - len(self._policy)

    async def generate(self, *, max_new_tokens: int | None = None,
                       stop_token_ids: list[int] | None = None) -> Turn:
        """The policy's continuation of ``tokens`` (appended to them)."""
        budget = self.remaining if max_new_tokens is None else min(max_new_tokens,
                                                                   self.remaining)
        if budget < 1:
            raise ValueError(f"sample {self._sample} of prompt {self._group}: no response budget "
                             f"left (rollout.max_new_tokens={self._budget}); check "
                             f"session.remaining before generating")
        params = {**self._params, "max_new_tokens": budget}
        if stop_token_ids is not None:
            params["stop_token_ids"] = list(stop_token_ids)
        seed = None if self._seed is None else derive_seed(
            self._seed, self._sample, self.turns) % (2**31 - 1)
        [out] = await self._client.generate([self.tokens], n=1, sampling_params=params,
                                            seed=seed, group_index_offset=self._group,
                                            **self._want)
        self.turns += 1
        return self._record(out)

    def _record(self, out: Sample) -> Turn:
        start, num = len(self.tokens), len(out.response_ids)
        if out.routes_TLK is not None:
            assert out.routes_TLK.shape[0] == start + num - 1, "route rows vs tokens"
            self._route_chunks.append(out.routes_TLK[self._routed:])
            self._routed = max(self._routed, start + num - 1)
        offsets = out.mask_offsets_R1
        for i in range(num):
            self._mask_rows.append(torch.empty(0, dtype=torch.int32) if offsets is None else
                                   out.mask_ids_M[int(offsets[i]):int(offsets[i + 1])])
        self.tokens += out.response_ids
        self._policy += [True] * num
        self._logprobs += out.rollout_logprobs_R.tolist()
        self._full_logprobs += out.full_logprobs_R.tolist()
        self._versions.append(out.weight_version)
        self.finish_reason = out.finish_reason
        return Turn(ids=list(out.response_ids), logprobs_R=out.rollout_logprobs_R,
                    routes_TLK=out.routes_TLK, mask_ids_M=out.mask_ids_M,
                    mask_offsets_R1=out.mask_offsets_R1, finish_reason=out.finish_reason)

    def append(self, ids: list[int]) -> None:
        """Tokens that the policy did not generate (environment feedback, tool output)."""
        ids = [int(i) for i in ids]
        bad = [i for i in ids if not 0 <= i < self.tokenizer.vocab_size]
        if bad:
            raise ValueError(f"session.append: token ids {bad[:5]} outside the tokenizer's "
                             f"vocabulary [0, {self.tokenizer.vocab_size})")
        if len(ids) > self.remaining:
            raise ValueError(f"session.append: {len(ids)} tokens exceed the {self.remaining} left "
                             f"of rollout.max_new_tokens={self._budget}")
        self.tokens += ids
        self._policy += [False] * len(ids)
        self._logprobs += [0.0] * len(ids)
        self._full_logprobs += [0.0] * len(ids)
        self._mask_rows += [torch.empty(0, dtype=torch.int32)] * len(ids)

    def to_sample(self, metadata: dict | None) -> Sample:
        """The trained sample (trailing environment tokens dropped)."""
        if not any(self._policy):
            raise ValueError(f"sample {self._sample} of prompt {self._group}: the custom rollout "
                             f"returned without calling session.generate()")
        num = max(i for i, p in enumerate(self._policy) if p) + 1
        p = self._prompt_len
        versions = sorted(set(self._versions))
        sample = Sample(
            group_index=self._group, sample_index=self._sample,
            prompt_ids=self.tokens[:p], response_ids=self.tokens[p:p + num],
            rollout_logprobs_R=torch.tensor(self._logprobs[:num], dtype=torch.float32),
            full_logprobs_R=torch.tensor(self._full_logprobs[:num], dtype=torch.float32),
            finish_reason=self.finish_reason, weight_version=",".join(versions),
            loss_mask_R=torch.tensor(self._policy[:num]),
            extra={"metadata": dict(metadata or {}), "turns": self.turns})
        if self._route_chunks:
            sample.routes_TLK = torch.cat(self._route_chunks)
            assert sample.routes_TLK.shape[0] == p + num - 1, "routes must cover the sequence"
        if self._want["return_sampling_mask"] and self._params.get("temperature", 1.0) > 0:
            rows = self._mask_rows[:num]
            sample.mask_ids_M = torch.cat(rows).to(torch.int32)
            lengths = torch.tensor([len(r) for r in rows], dtype=torch.long)
            sample.mask_offsets_R1 = torch.cat([torch.zeros(1, dtype=torch.long),
                                                lengths.cumsum(0)])
        return sample


class CustomRollout:
    """Runs the user's ``rollout.generate`` function for every sample of a step."""

    def __init__(self, path: str, *, tokenizer: Tokenizer, concurrency: int):
        self.fn = import_callable(path, what="rollout.generate")
        if not inspect.iscoroutinefunction(self.fn):
            raise ValueError(f"rollout.generate={path!r} must be an async function "
                             f"(async def f(prompt, session)); see moerl.custom_rollout")
        self.path, self.tokenizer, self.concurrency = path, tokenizer, concurrency

    def generate(self, manager, prompts: list[Prompt], *, n: int, step: int,
                 group_offset: int = 0, greedy: bool = False) -> list[Sample]:
        """``n`` samples per prompt, ordered by (prompt, sample), as ``manager.generate``."""
        return manager.run(self._all(manager, prompts, n=n, step=step,
                                     group_offset=group_offset, greedy=greedy))

    async def _all(self, manager, prompts, *, n, step, group_offset, greedy) -> list[Sample]:
        from moerl.rollout_manager import hash_seed

        semaphore = asyncio.Semaphore(self.concurrency)
        seed = None if greedy else hash_seed(manager.seed, step)

        async def one(g: int, j: int) -> Sample:
            # Every turn of a group's samples goes to one server (its prefix cache, its routes);
            # groups are spread over a fleet's servers in turn (behind a router: the router's).
            clients = manager.generation_clients
            client = clients[(group_offset + g) % len(clients)]
            session = RolloutSession(
                client=client, prompt_ids=list(prompts[g].ids), tokenizer=self.tokenizer,
                sampling_params=manager.sampling.params(greedy=greedy), seed=seed,
                group_index=group_offset + g, sample_index=j,
                max_new_tokens=manager.sampling.max_new_tokens,
                return_routes=manager.return_routes and not greedy,
                return_mask=manager.return_mask and not greedy)
            async with semaphore:
                try:
                    metadata = await self.fn(prompts[g], session)
                except Exception as err:
                    raise RuntimeError(f"rollout.generate={self.path!r} raised on prompt "
                                       f"{group_offset + g}, sample {j}: "
                                       f"{type(err).__name__}: {err}") from err
            if metadata is not None and not isinstance(metadata, dict):
                raise ValueError(f"rollout.generate={self.path!r} returned "
                                 f"{type(metadata).__name__}; return a dict or None")
            return session.to_sample(metadata)

        return list(await asyncio.gather(*[one(g, j) for g in range(len(prompts))
                                           for j in range(n)]))
