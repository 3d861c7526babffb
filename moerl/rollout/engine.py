"""moerl's built-in rollout engine: a transformers MoE model served with continuous batching.

Shape-suffix legend: B rows in the running batch, S cached sequence length (left-padded), H KV
heads, D head dim, V vocabulary, L hidden layers, K experts per token, U unique sequences in a
prefill, P prompt length.

It is deliberately a different implementation from the Megatron trainer (as SGLang is): the
Hugging Face modelling code, a KV cache, and moerl's sampler. What it shares with SGLang is the
observable behaviour the wire contract describes (``moerl.rollout.protocol``):

- Continuous batching: requests that arrive while others decode are prefilled (left-padded,
  explicit position ids) and merged into the running batch's KV cache; finished rows leave it.
  Identical sequences admitted together are prefilled once (the ``n`` samples of a prompt), and
  a small LRU prompt cache keeps recent prompt prefills (dropped by ``/flush_cache`` and by every
  weight change, which SGLang also flushes).
- Route capture: a forward hook on every MoE router (``mlp.gate``, which in transformers >= 5
  returns ``(router_logits, scores, indices)``) records the top-k expert ids of every token that
  goes through the model; dense layers stay zero, exactly as in SGLang's capture buffer. A
  request retracted by ``pause_generation(retract)`` is re-prefilled on resume, and as in SGLang
  the re-prefill's routes replace the earlier ones for those positions.
- Sampling with support capture (``moerl.rollout.sampler``), per-request generators (a
  ``sampling_seed`` reproduces a request's output whatever it is batched with).
- Weight versions per request (``weight_versions`` spans), pause modes ``abort`` / ``retract`` /
  ``in_place``, and in-place weight writes between steps.

All engine state is owned by one background thread; other threads talk to it through
:meth:`Engine.submit`, :meth:`Engine.abort` and :meth:`Engine.call`.
"""

from __future__ import annotations

import collections
import concurrent.futures
import logging
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
from transformers import DynamicCache
from transformers.cache_utils import DynamicLayer

from moerl.rollout.protocol import (
    MoeLayout,
    encode_mask_compact,
    encode_routed_experts,
    encode_routes_compact,
)
from moerl.rollout.sampler import sample_with_support
from moerl.rollout.schema import GenerateItem

logger = logging.getLogger(__name__)


@dataclass(eq=False)
class GenerationRequest:
    """One sequence to generate (one element of a /generate batch, after ``n`` expansion): the
    validated request item and the engine's state for it."""

    item: GenerateItem
    done: Callable[[dict], None]  # called once, on the engine thread, with the output dict
    client: int = 0  # the /generate call it came in: admission takes turns between clients
    # Engine-owned state.
    generator: torch.Generator | None = None
    uniforms: list[float] = field(default_factory=list)  # pre-drawn from ``generator``
    output_ids: list[int] = field(default_factory=list)
    full_logprobs: list[float] = field(default_factory=list)
    sampling_logprobs: list[Any] = field(default_factory=list)
    mask_rows: list[np.ndarray] = field(default_factory=list)
    route_chunks: list[np.ndarray] = field(default_factory=list)  # int32 [n, L, K] chunks
    version_events: list[tuple[str, int]] = field(default_factory=list)
    num_retractions: int = 0
    cached_tokens: int = 0
    arrival: float = field(default_factory=time.monotonic)

    @property
    def sequence(self) -> list[int]:
        return self.item.prompt_ids + self.output_ids


@dataclass
class _Prefill:
    """One prefilled sequence: its KV per layer, next-token logits and routes."""

    kv: list[tuple[torch.Tensor, torch.Tensor]]  # per attention layer, [1, H, P, D]
    logits_V: torch.Tensor
    routes_PLK: np.ndarray
    num_bytes: int


def _weight_version_spans(events: list[tuple[str, int]], current: str, num_tokens: int) -> list:
    """SGLang's ``compute_weight_version_spans``: output-token ranges per weight version."""
    spans: list[dict] = []
    for version, end in [*events, (current, num_tokens)]:
        end = min(end, num_tokens)
        if spans and end <= spans[-1]["end"]:
            continue
        if spans and version == spans[-1]["version"]:
            spans[-1]["end"] = end
            continue
        spans.append({"version": version, "start": spans[-1]["end"] if spans else 0, "end": end})
    return spans


# float16 is the field's other answer to the train/inference mismatch (more mantissa than bf16).
ENGINE_DTYPES = ("float32", "bfloat16", "float16")


class Engine:
    """A Hugging Face causal-LM MoE model behind a continuous-batching generation loop."""

    def __init__(self, model_dir: str | Path, *, dtype: str = "float32", seed: int = 0,
                 max_batch_size: int = 64, sampling_mask_max_tokens: int = 4096,
                 prompt_cache_bytes: int = 64 << 20, weight_version: str = "default"):
        from transformers import AutoModelForCausalLM

        if dtype not in ENGINE_DTYPES:
            raise ValueError(f"dtype must be one of {ENGINE_DTYPES}, got {dtype!r}")
        self.model_dir = str(model_dir)
        self.dtype = dtype
        self.model = AutoModelForCausalLM.from_pretrained(
            self.model_dir, dtype=getattr(torch, dtype)).eval()
        self.config = self.model.config
        self.layout = MoeLayout.from_hf_config(self.config)
        self.context_length = int(getattr(self.config, "max_position_embeddings", 0) or 1 << 30)
        self.eos_token_ids = self._eos_ids()
        self.max_batch_size = max_batch_size
        self.sampling_mask_max_tokens = sampling_mask_max_tokens
        self.prompt_cache_bytes = prompt_cache_bytes
        self.weight_version = weight_version
        self._routers = self._register_route_hooks()
        self._captured: dict[int, torch.Tensor] = {}
        self._seed_rng = np.random.default_rng(seed)
        # Engine-thread state.
        self._running: list[GenerationRequest] = []
        self._cache = None  # DynamicCache of the running batch
        self._mask_BS: torch.Tensor | None = None  # bool, True = real token (left padding)
        self._waiting: collections.deque[GenerationRequest] = collections.deque()
        self._prompt_cache: collections.OrderedDict[tuple, _Prefill] = collections.OrderedDict()
        self._prompt_cache_used = 0
        self._paused = False
        self._spec_cache: tuple | None = None
        self._batch_version = 0  # bumped whenever rows join or leave the running batch
        # Cross-thread inbox.
        self._cond = threading.Condition()
        self._inbox: list[GenerationRequest] = []
        self._aborts: list[tuple[set[str], str]] = []
        self._commands: list[tuple[Callable[[], Any], concurrent.futures.Future]] = []
        self._stop = False
        self._thread = threading.Thread(target=self._loop, name="moerl-engine", daemon=True)
        self.steps = 0  # decode steps taken
        self.num_finished = 0  # requests answered (finished or aborted)
        self.last_error: str | None = None  # the last step's failure; None once a step succeeds

    # ---------------------------------------------------------------- setup

    def _eos_ids(self) -> frozenset[int]:
        ids: set[int] = set()
        for source in (self.config, getattr(self.model, "generation_config", None)):
            value = getattr(source, "eos_token_id", None)
            if value is not None:
                ids.update([value] if isinstance(value, int) else value)
        return frozenset(ids)

    def _register_route_hooks(self) -> dict[int, torch.nn.Module]:
        routers = {}
        for i, layer in enumerate(self.model.model.layers):
            mlp = getattr(layer, "mlp", None)
            if mlp is not None and hasattr(mlp, "experts") and hasattr(mlp, "gate"):
                routers[i] = mlp.gate
                mlp.gate.register_forward_hook(self._route_hook(i))
        if tuple(routers) != self.layout.moe_layers:
            raise ValueError(f"the model's MoE routers sit in layers {list(routers)} but its "
                             f"config says {list(self.layout.moe_layers)}")
        return routers

    def _route_hook(self, layer: int):
        K = self.layout.top_k

        def hook(module, args, output):
            indices = output[-1] if isinstance(output, tuple) else None
            if not (isinstance(indices, torch.Tensor) and indices.shape[-1] == K
                    and indices.dtype in (torch.int64, torch.int32)):
                raise RuntimeError(f"router of layer {layer} did not return top-{K} indices "
                                   f"last (transformers layout changed?)")
            self._captured[layer] = indices.reshape(-1, K)
        return hook

    def _take_routes(self, num_rows: int, num_positions: int) -> np.ndarray:
        """Routes captured by the last forward as int32 ``[rows, positions, L, K]``."""
        L, K = self.layout.num_hidden_layers, self.layout.top_k
        out = np.zeros((num_rows, num_positions, L, K), dtype=np.int32)
        for layer in self.layout.moe_layers:
            out[:, :, layer, :] = self._captured.pop(layer).view(num_rows, num_positions, K).numpy()
        return out

    # ---------------------------------------------------------------- cross-thread API

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        with self._cond:
            self._stop = True
            self._cond.notify_all()
        self._thread.join(timeout=30)

    @property
    def alive(self) -> bool:
        return self._thread.is_alive()

    def submit(self, requests: list[GenerationRequest]) -> None:
        with self._cond:
            self._inbox.extend(requests)
            self._cond.notify_all()

    def abort(self, rids: set[str], message: str = "Aborted by the client") -> None:
        with self._cond:
            self._aborts.append((set(rids), message))
            self._cond.notify_all()

    def cancel(self, requests: list[GenerationRequest], message: str) -> None:
        """Abort these very requests (by identity: rids are the clients' and need not be
        unique), wherever they are; used when their client has gone."""
        ids = {id(r) for r in requests}
        self.call(lambda: self._abort_requests(lambda r: id(r) in ids, message))

    def call(self, fn: Callable[[], Any]) -> concurrent.futures.Future:
        """Run ``fn`` on the engine thread between two steps; returns its future."""
        future: concurrent.futures.Future = concurrent.futures.Future()
        with self._cond:
            self._commands.append((fn, future))
            self._cond.notify_all()
        return future

    # ---------------------------------------------------------------- engine thread

    def _loop(self) -> None:
        while True:
            with self._cond:
                while not (self._stop or self._inbox or self._aborts or self._commands
                           or (not self._paused and (self._running or self._waiting))):
                    self._cond.wait()
                if self._stop:
                    return
                inbox, self._inbox = self._inbox, []
                aborts, self._aborts = self._aborts, []
                commands, self._commands = self._commands, []
            with torch.inference_mode():
                self._iterate(inbox, aborts, commands)

    def _iterate(self, inbox, aborts, commands) -> None:
        """One loop iteration on the engine thread: inbox, aborts, commands, then one step."""
        self._waiting.extend(inbox)
        for rids, message in aborts:
            self._abort_requests(lambda r: r.item.rid in rids, message)
        for fn, future in commands:
            if future.set_running_or_notify_cancel():
                try:
                    future.set_result(fn())
                except Exception as e:  # reported to the caller, the engine keeps serving
                    future.set_exception(e)
        if self._paused:
            return
        try:
            if self._waiting and len(self._running) < self.max_batch_size:
                self._admit()
            if self._running:
                self._decode_step()
                self.last_error = None
        except Exception as exc:
            self.last_error = f"{type(exc).__name__}: {exc}"
            logger.exception("engine step failed; aborting the batch")
            self._abort_requests(lambda r: True, "Internal error in the moerl engine",
                                 status_code=500, err_type="InternalServerError")

    def _new_generator(self, req: GenerationRequest) -> torch.Generator:
        seed = req.item.sampling.seed
        if seed is None:
            seed = int(self._seed_rng.integers(0, 2**63 - 1))
        return torch.Generator().manual_seed(seed % (2**64))

    @staticmethod
    def _next_uniform(req: GenerationRequest) -> float:
        # Drawn in chunks: the sequence of uniforms is a function of the seed alone, so a
        # request's samples do not depend on what it is batched with (or on retraction).
        if not req.uniforms:
            req.uniforms = torch.rand(64, generator=req.generator, dtype=torch.float64).tolist()
            req.uniforms.reverse()
        return req.uniforms.pop()

    # ---------------------------------------------------------------- prefill and batching

    def _forward(self, input_ids_BS, mask_BS, position_ids_BS, cache):
        out = self.model(input_ids=input_ids_BS, attention_mask=mask_BS,
                         position_ids=position_ids_BS, past_key_values=cache, use_cache=True,
                         logits_to_keep=1)
        return out.logits[:, -1, :].float()

    def _prefill(self, sequences: list[tuple]) -> list[_Prefill]:
        """Prefill ``sequences`` as one left-padded batch; return each one's KV, logits, routes."""
        lengths = [len(s) for s in sequences]
        U, S = len(sequences), max(lengths)
        input_ids_US = torch.zeros(U, S, dtype=torch.long)
        mask_US = torch.zeros(U, S, dtype=torch.long)
        for u, seq in enumerate(sequences):
            input_ids_US[u, S - len(seq):] = torch.tensor(seq)
            mask_US[u, S - len(seq):] = 1
        position_ids_US = (mask_US.cumsum(-1) - 1).clamp(min=0)
        cache = DynamicCache(config=self.config)
        logits_UV = self._forward(input_ids_US, mask_US, position_ids_US, cache)
        routes_USLK = self._take_routes(U, S)
        out = []
        for u, n in enumerate(lengths):
            kv = [(layer.keys[u:u + 1, :, S - n:].clone(), layer.values[u:u + 1, :, S - n:].clone())
                  for layer in cache.layers]
            num_bytes = sum(k.numel() * k.element_size() * 2 for k, _ in kv)
            out.append(_Prefill(kv=kv, logits_V=logits_UV[u].clone(),
                                routes_PLK=routes_USLK[u, S - n:].copy(), num_bytes=num_bytes))
        return out

    def _cached_prefill(self, sequences: list[tuple], cacheable: set[tuple]
                        ) -> tuple[dict[tuple, _Prefill], set]:
        """Prefill each distinct sequence once, reusing the prompt cache and adding the
        ``cacheable`` ones (prompts; a retracted request's prompt + output is not worth keeping).

        Returns the prefills by sequence and the set of sequences served from the cache.
        """
        found = {}
        for seq in dict.fromkeys(sequences):
            hit = self._prompt_cache.get(seq)
            if hit is not None:
                self._prompt_cache.move_to_end(seq)
                found[seq] = hit
        from_cache = set(found)
        todo = [s for s in dict.fromkeys(sequences) if s not in found]
        if todo:
            for seq, pre in zip(todo, self._prefill(todo)):
                found[seq] = pre
                if seq in cacheable:
                    self._remember(seq, pre)
        return found, from_cache

    def _remember(self, seq: tuple, pre: _Prefill) -> None:
        if pre.num_bytes > self.prompt_cache_bytes:
            return
        self._prompt_cache[seq] = pre
        self._prompt_cache_used += pre.num_bytes
        while self._prompt_cache_used > self.prompt_cache_bytes:
            _, old = self._prompt_cache.popitem(last=False)
            self._prompt_cache_used -= old.num_bytes

    def flush_prompt_cache(self) -> None:
        self._prompt_cache.clear()
        self._prompt_cache_used = 0

    def _admit(self) -> None:
        """Move waiting requests into the running batch: prefill, merge KV, sample first token."""
        admitted = self._take_fairly(self.max_batch_size - len(self._running))
        seqs = [tuple(r.sequence) for r in admitted]
        prefills, first_use = self._cached_prefill(
            seqs, {s for r, s in zip(admitted, seqs) if not r.output_ids})
        for req, seq in zip(admitted, seqs):
            if req.generator is None:
                req.generator = self._new_generator(req)
            # The re-prefill of a retracted request recomputes every position's route.
            req.route_chunks = [prefills[seq].routes_PLK]
            req.cached_tokens = len(seq) if seq in first_use else 0
            first_use.add(seq)
        done_now = [r.item.sampling.max_new_tokens == 0 for r in admitted]
        for req, now in zip(admitted, done_now):
            if now:
                self._finish(req, {"type": "length", "length": 0})
        live = [(r, s) for r, s, now in zip(admitted, seqs, done_now) if not now]
        if not live:
            return
        self._merge([prefills[s] for _, s in live])
        self._running.extend(r for r, _ in live)
        logits_BV = torch.stack([prefills[s].logits_V for _, s in live])
        self._sample_rows(list(range(len(self._running) - len(live), len(self._running))),
                          logits_BV)

    def _take_fairly(self, room: int) -> list[GenerationRequest]:
        """Up to ``room`` waiting requests, one per client in turn (clients in order of their
        oldest waiting request, each client's requests in order): a client that asks for
        thousands of sequences cannot hold every other client back until all of them are done."""
        queues: dict[int, collections.deque] = {}
        for req in self._waiting:
            queues.setdefault(req.client, collections.deque()).append(req)
        taken: list[GenerationRequest] = []
        while len(taken) < room and queues:
            for client in list(queues):
                if len(taken) == room:
                    break
                taken.append(queues[client].popleft())
                if not queues[client]:
                    del queues[client]
        chosen = {id(r) for r in taken}
        self._waiting = collections.deque(r for r in self._waiting if id(r) not in chosen)
        return taken

    def _merge(self, prefills: list[_Prefill]) -> None:
        """Append prefilled rows to the running batch, left-padding KV to a common length."""
        self._batch_version += 1
        S_old = 0 if self._mask_BS is None else self._mask_BS.shape[1]
        S = max(S_old, max(p.kv[0][0].shape[2] for p in prefills))
        masks = [] if self._mask_BS is None else [_pad_left(self._mask_BS, S - S_old)]
        for p in prefills:
            n = p.kv[0][0].shape[2]
            masks.append(torch.cat([torch.zeros(1, S - n, dtype=torch.bool),
                                    torch.ones(1, n, dtype=torch.bool)], dim=1))
        if self._cache is None:
            layers = [(None, None)] * len(prefills[0].kv)
        else:
            layers = [(layer.keys, layer.values) for layer in self._cache.layers]
        merged = []
        for i, (keys, values) in enumerate(layers):
            ks = [] if keys is None else [_pad_left(keys, S - S_old)]
            vs = [] if values is None else [_pad_left(values, S - S_old)]
            for p in prefills:
                k, v = p.kv[i]
                ks.append(_pad_left(k, S - k.shape[2]))
                vs.append(_pad_left(v, S - v.shape[2]))
            merged.append(_AppendLayer.holding(torch.cat(ks), torch.cat(vs)))
        self._cache = DynamicCache(config=self.config)
        self._cache.layers = merged
        self._mask_BS = torch.cat(masks)

    def _keep_rows(self, keep: list[int]) -> None:
        """Drop every running row not in ``keep`` and trim all-padding columns."""
        self._batch_version += 1
        self._running = [self._running[i] for i in keep]
        if not keep:
            self._cache, self._mask_BS = None, None
            return
        index = torch.tensor(keep, dtype=torch.long)
        mask_BS = self._mask_BS.index_select(0, index)
        start = int(mask_BS.any(dim=0).byte().argmax())
        self._mask_BS = mask_BS[:, start:]
        self._cache.layers = [
            _AppendLayer.holding(layer.keys.index_select(0, index)[:, :, start:],
                                 layer.values.index_select(0, index)[:, :, start:])
            for layer in self._cache.layers]

    # ---------------------------------------------------------------- decode and sampling

    def _decode_step(self) -> None:
        B = len(self._running)
        input_ids_B1 = torch.tensor([[r.output_ids[-1]] for r in self._running], dtype=torch.long)
        position_ids_B1 = torch.tensor([[len(r.item.prompt_ids) + len(r.output_ids) - 1]
                                        for r in self._running], dtype=torch.long)
        self._mask_BS = torch.cat([self._mask_BS, torch.ones(B, 1, dtype=torch.bool)], dim=1)
        mask = self._mask_BS
        if self.config._attn_implementation == "sdpa":
            # One query per row sees every cached key: the causal part of the mask is empty, so
            # the SDPA boolean mask is just the padding mask ([B, 1, 1, S], True = attend), and
            # transformers uses a 4-D mask as given instead of rebuilding it every step.
            mask = self._mask_BS[:, None, None, :]
        logits_BV = self._forward(input_ids_B1, mask, position_ids_B1, self._cache)
        routes_B1LK = self._take_routes(B, 1)
        for i, req in enumerate(self._running):
            req.route_chunks.append(routes_B1LK[i])
        self.steps += 1
        self._sample_rows(list(range(B)), logits_BV)

    def _sampling_args(self, rows: list[int]) -> dict[str, Any]:
        """Per-row sampling parameters as tensors, plus which filters any row uses; cached
        while the batch is unchanged."""
        key = (self._batch_version, tuple(rows))
        if self._spec_cache is None or self._spec_cache[0] != key:
            reqs = [self._running[i] for i in rows]
            specs = [r.item.sampling for r in reqs]
            V = self.layout.vocab_size
            self._spec_cache = (key, {
                "temperature_B": torch.tensor([s.temperature for s in specs]),
                "top_k_B": torch.tensor([s.top_k for s in specs], dtype=torch.long),
                "top_p_B": torch.tensor([s.top_p for s in specs]),
                "min_p_B": torch.tensor([s.min_p for s in specs]),
                "greedy_B": torch.tensor([s.greedy for s in specs]),
                "need_top_k": any(s.top_k < V for s in specs),
                "need_top_p": any(s.top_p < 1.0 for s in specs),
                "need_min_p": any(s.min_p > 0.0 for s in specs),
                "any_greedy": any(s.greedy for s in specs),
                "support_logprobs": any(r.item.return_mask and r.item.mask_mode == "support"
                                        for r in reqs)})
        return self._spec_cache[1]

    def _sample_rows(self, rows: list[int], logits_BV: torch.Tensor) -> None:
        """Sample the next token of running rows ``rows``, record it, retire finished rows."""
        reqs = [self._running[i] for i in rows]
        out = sample_with_support(
            logits_BV, **self._sampling_args(rows),
            uniform_B=torch.tensor([self._next_uniform(r) for r in reqs], dtype=torch.float64))
        # The step worked: clear the failure before any result goes out, so that a client that
        # has its answer never sees /health still report the last step's error.
        self.last_error = None
        tokens = out.token_B.tolist()
        full = out.full_logprob_B.tolist()
        selected = out.sampling_logprob_B.tolist()
        kept_len = out.kept_len_B.tolist()
        bounds = np.cumsum([0] + kept_len)
        kept_ids = out.kept_ids_M.numpy().astype(np.int32)
        kept_lp = None if out.kept_logprobs_M is None else out.kept_logprobs_M.numpy()
        finished: set[int] = set()
        for j, (row, req) in enumerate(zip(rows, reqs)):
            if req.item.return_mask and kept_len[j] > self.sampling_mask_max_tokens:
                # SGLang aborts with 400 and does not commit the sampled token.
                self._finish(req, _mask_overflow(self.sampling_mask_max_tokens))
                finished.add(row)
                continue
            req.output_ids.append(tokens[j])
            req.full_logprobs.append(full[j])
            if req.item.return_mask:
                lo, hi = bounds[j], bounds[j + 1]
                req.mask_rows.append(kept_ids[lo:hi])
                req.sampling_logprobs.append(kept_lp[lo:hi] if req.item.mask_mode == "support"
                                             else selected[j])
            reason = self._finish_reason(req, tokens[j])
            if reason is not None:
                self._finish(req, reason)
                finished.add(row)
        if finished:
            self._keep_rows([i for i in range(len(self._running)) if i not in finished])

    def _finish_reason(self, req: GenerationRequest, token: int) -> dict | None:
        spec = req.item.sampling
        if token in spec.stop_token_ids or (not spec.ignore_eos and token in self.eos_token_ids):
            return {"type": "stop", "matched": token}
        if len(req.output_ids) >= spec.max_new_tokens:
            return {"type": "length", "length": spec.max_new_tokens}
        return None

    # ---------------------------------------------------------------- results

    def _finish(self, req: GenerationRequest, reason: dict) -> None:
        self.num_finished += 1
        try:
            req.done(self._build_output(req, reason))
        except Exception:  # a broken callback must not take the engine down
            logger.exception("result callback failed for request %s", req.item.rid)

    def _build_output(self, req: GenerationRequest, reason: dict) -> dict:
        """The /generate output in SGLang's shape (``BatchTokenIDOutput`` path: no ``text``)."""
        R = len(req.output_ids)
        spans = _weight_version_spans(req.version_events, self.weight_version, R)
        meta: dict[str, Any] = {
            "id": req.item.rid, "finish_reason": reason, "prompt_tokens": len(req.item.prompt_ids),
            "weight_version": spans[-1]["version"], "num_retractions": req.num_retractions,
        }
        if req.item.return_logprob:
            meta["input_token_logprobs"] = []
            meta["output_token_logprobs"] = [[lp, t, None] for lp, t in
                                             zip(req.full_logprobs, req.output_ids)]
            meta["output_token_logprobs_length"] = R
        if req.item.return_mask and R:
            if req.item.compact:
                meta["moerl_sampling_mask"] = encode_mask_compact(
                    req.mask_rows, vocab_size=self.layout.vocab_size)
            else:
                meta["output_token_sampling_mask"] = [row.tolist() for row in req.mask_rows]
            meta["output_token_sampling_logprobs"] = [
                v.tolist() if isinstance(v, np.ndarray) else v for v in req.sampling_logprobs]
            meta["output_token_sampling_mask_length"] = R
        meta.update({"reasoning_tokens": 0, "completion_tokens": R,
                     "cached_tokens": req.cached_tokens, "weight_versions": spans,
                     "e2e_latency": time.monotonic() - req.arrival})
        if req.item.return_routes and reason["type"] != "abort":
            routes_TLK = self._routes_of(req)
            if req.item.compact:
                meta["moerl_routed_experts"] = encode_routes_compact(routes_TLK, self.layout)
            else:
                meta["routed_experts"] = encode_routed_experts(routes_TLK)
        return {"output_ids": list(req.output_ids), "meta_info": meta}

    def _routes_of(self, req: GenerationRequest) -> np.ndarray:
        L, K = self.layout.num_hidden_layers, self.layout.top_k
        chunks = [c.reshape(-1, L, K) for c in req.route_chunks]
        routes_TLK = np.concatenate(chunks) if chunks else np.zeros((0, L, K), np.int32)
        seqlen = len(req.item.prompt_ids) + len(req.output_ids)
        # SGLang returns [start, seqlen - 1): the last token never went through the model.
        start = min(req.item.routes_start_len, max(seqlen - 1, 0))
        return routes_TLK[start:seqlen - 1]

    def _abort_requests(self, predicate: Callable[[GenerationRequest], bool], message: str, *,
                        status_code: int | None = None, err_type: str | None = None) -> int:
        reason = {"type": "abort", "message": message, "status_code": status_code,
                  "err_type": err_type}
        hit = [r for r in self._waiting if predicate(r)]
        self._waiting = collections.deque(r for r in self._waiting if not predicate(r))
        running_hit = [i for i, r in enumerate(self._running) if predicate(r)]
        hit += [self._running[i] for i in running_hit]
        if running_hit:
            self._keep_rows([i for i in range(len(self._running)) if i not in set(running_hit)])
        for req in hit:
            self._finish(req, reason)
        return len(hit)

    # ---------------------------------------------------------------- control (engine thread)

    def abort_all(self, message: str) -> int:
        """Abort every running and waiting request (engine thread only)."""
        return self._abort_requests(lambda r: True, message)

    def pause(self, mode: str) -> int:
        """SGLang's pause modes; returns how many requests were aborted or retracted."""
        self._paused = True
        if mode == "abort":
            return self.abort_all("Aborted by pause_generation")
        if mode == "retract":
            retracted = self._running
            for req in retracted:
                req.num_retractions += 1
            self._keep_rows([])
            self._waiting.extendleft(reversed(retracted))
            return len(retracted)
        return 0  # in_place: keep the KV of running rows and simply stop stepping

    def resume(self) -> None:
        self._paused = False

    @property
    def paused(self) -> bool:
        return self._paused

    def num_requests(self) -> tuple[int, int]:
        return len(self._running), len(self._waiting)

    def set_weight_version(self, version: str | None) -> None:
        """Record a weight change: drop cached prefills, note spans of live requests."""
        self.flush_prompt_cache()
        if version is None or version == self.weight_version:
            return
        for req in [*self._running, *self._waiting]:
            if req.output_ids:
                req.version_events.append((self.weight_version, len(req.output_ids)))
        self.weight_version = version


class _AppendLayer(DynamicLayer):
    """A ``DynamicLayer`` (transformers 5.23) with spare capacity: a decode step writes its new
    key/value into the buffer instead of ``DynamicLayer.update``'s ``torch.cat`` of the whole
    cache, so appending costs O(new tokens) rather than O(cache length). ``keys`` / ``values``
    stay views of the filled prefix, which is all transformers reads."""

    @classmethod
    def holding(cls, keys: torch.Tensor, values: torch.Tensor) -> "_AppendLayer":
        layer = cls()
        layer.lazy_initialization(keys, values)
        layer._fill(keys, values, capacity=2 * keys.shape[2] + 16)
        return layer

    def _fill(self, keys: torch.Tensor, values: torch.Tensor, *, capacity: int) -> None:
        B, H, S, D = keys.shape
        self._k = keys.new_empty(B, H, capacity, D)
        self._v = values.new_empty(B, H, capacity, values.shape[3])
        self._k[:, :, :S] = keys
        self._v[:, :, :S] = values
        self._len = S
        self.keys, self.values = self._k[:, :, :S], self._v[:, :, :S]

    def update(self, key_states, value_states, *args, **kwargs):
        n = key_states.shape[2]
        if self._len + n > self._k.shape[2]:
            self._fill(self.keys, self.values, capacity=2 * (self._len + n))
        self._k[:, :, self._len:self._len + n] = key_states
        self._v[:, :, self._len:self._len + n] = value_states
        self._len += n
        self.keys, self.values = self._k[:, :, :self._len], self._v[:, :, :self._len]
        return self.keys, self.values


def _pad_left(t: torch.Tensor, n: int) -> torch.Tensor:
    """Left-pad the sequence dim (dim 2 of [B, H, S, D], dim 1 of [B, S]) with n zeros."""
    if n == 0:
        return t
    dim = 2 if t.dim() == 4 else 1
    shape = list(t.shape)
    shape[dim] = n
    return torch.cat([torch.zeros(shape, dtype=t.dtype), t], dim=dim)


def _mask_overflow(limit: int) -> dict:
    return {"type": "abort", "status_code": 400, "err_type": "BadRequestError",
            "message": f"Sampling support exceeds --sampling-mask-max-tokens={limit}, commonly "
                       f"because of cutoff ties. Lower top_k to leave more headroom or increase "
                       f"the server limit."}
