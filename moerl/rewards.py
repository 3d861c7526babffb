"""Scoring samples: the task's verifier, math-verify, your own function, or a remote server.

``task.reward`` names one source or a comma-separated list of them; a sample's score is the sum.

- ``builtin``: the task's own verifier (the exact checker of ``moerl.tasks.math_jsonl`` for data
  tasks, the arithmetic task's exact match).
- ``math_verify``: the ``math-verify`` package (symbolic equivalence: ``x(x+2) == x^2+2x``):
  1.0 when the response's final answer equals the reference answer, else 0.0.
- ``package.module:function``: your function (importable from the working directory or
  ``PYTHONPATH``)::

      def my_reward(prompt: str, response: str, *, response_ids: list[int], answer: str,
                    metadata: dict) -> float | dict

  ``prompt`` is the prompt as the model saw it (chat template applied), ``response`` the decoded
  response (special tokens skipped), ``answer`` the record's reference answer ("" if none),
  ``metadata`` the record's other fields (and, for a custom rollout, the dict its function
  returned). Return a float, or a dict with a ``score`` and extra numeric fields, which are
  logged as ``reward/extra/<name>`` (their mean over the step's samples). ``async def``
  functions are awaited. With ``task.reward_batched=true`` every argument is a list (one entry
  per sample) and the function returns a list of the same length.
- ``http://host:port/path`` (or https): a remote reward server. One ``POST`` per sample with the
  JSON object ``{"prompt", "response", "response_ids", "answer", "metadata"}``; it answers a
  JSON number or an object as above. Connection errors, timeouts, HTTP 429 and 5xx are retried
  with exponential backoff (``task.reward_retries`` attempts); other statuses are errors.

Every call is bounded by ``task.reward_timeout_s`` and at most ``task.reward_concurrency`` run at
once (synchronous functions in daemon threads; one that times out is abandoned, since Python
cannot stop a thread, and does not hold up the trainer's exit). A call that raises, times out or returns no finite score is an error for its
sample, never a silent zero: ``task.reward_on_error=fail`` raises :class:`RewardError` naming the
sample and the source; ``zero`` scores that source 0 for the sample, logs a warning naming it and
counts it in the ``reward/errors`` metric.
"""

from __future__ import annotations

import asyncio
import importlib
import inspect
import json
import logging
import math
import random
import threading
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Any, Callable, Protocol

from moerl.tasks.base import Prompt, Task

log = logging.getLogger("moerl.rewards")


class RewardError(RuntimeError):
    """A reward could not be computed and the run's policy is to fail the step."""


@dataclass(frozen=True)
class RewardItem:
    """One sample to score."""

    prompt: Prompt
    response: str
    response_ids: list[int]
    label: str  # names the sample in errors: "step 3, prompt 2, sample 1"
    metadata: dict = field(default_factory=dict)

    def kwargs(self) -> dict:
        return dict(response_ids=self.response_ids, answer=self.prompt.answer,
                    metadata=self.metadata)


@dataclass
class Scores:
    scores: list[float]  # one per item: the sum over sources
    metrics: dict[str, float]  # reward/errors, reward/extra/<name>, reward/<source> (several)


class RewardSource(Protocol):
    name: str
    batched: bool

    async def __call__(self, items: list[RewardItem], run: Callable) -> Any:
        """The raw result for ``items`` (one item unless batched); ``await run(fn, *args)``
        runs a synchronous callable in a daemon thread."""
        ...


# ============================================================================ sources


class TaskVerifier:
    name, batched = "builtin", False

    def __init__(self, task: Task):
        self.task = task

    async def __call__(self, items, run):
        return await run(self.task.reward, items[0].prompt, items[0].response_ids)


class MathVerify:
    name, batched = "math_verify", False

    def __init__(self):
        try:
            import math_verify
        except ImportError:
            raise ValueError("task.reward=math_verify needs the math-verify package: "
                             "pip install math-verify") from None
        self._mv = math_verify
        # It warns on every call that its own (signal-based) timeouts are off: they are ours.
        logging.getLogger("math_verify").setLevel(logging.ERROR)

    def check(self, response: str, answer: str) -> float:
        # Timeouts are ours (the scorer's); math-verify's own use signals, main thread only.
        gold = self._mv.parse(answer if "$" in answer else f"${answer}$", parsing_timeout=None)
        predicted = self._mv.parse(response, parsing_timeout=None)
        return float(bool(gold) and bool(predicted)
                     and self._mv.verify(gold, predicted, timeout_seconds=None))

    async def __call__(self, items, run):
        return await run(self.check, items[0].response, items[0].prompt.answer)


class ImportedFunction:
    def __init__(self, path: str, *, batched: bool):
        self.name, self.batched = path, batched
        self.fn = import_callable(path, what="task.reward")
        self.is_async = inspect.iscoroutinefunction(self.fn)

    async def __call__(self, items, run):
        if self.batched:
            args = ([i.prompt.text for i in items], [i.response for i in items])
            kwargs = dict(response_ids=[i.response_ids for i in items],
                          answer=[i.prompt.answer for i in items],
                          metadata=[i.metadata for i in items])
        else:
            args, kwargs = (items[0].prompt.text, items[0].response), items[0].kwargs()
        if self.is_async:
            return await self.fn(*args, **kwargs)
        return await run(lambda: self.fn(*args, **kwargs))


class RemoteReward:
    batched = False

    def __init__(self, url: str, *, retries: int, timeout_s: float):
        self.name, self.url, self.retries, self.timeout_s = url, url, retries, timeout_s
        # Each attempt has its own timeout; the whole call may take every attempt and backoff.
        self.deadline_s = retries * (timeout_s + 4.0)

    async def __call__(self, items, run):
        import aiohttp

        item = items[0]
        body = json.dumps({"prompt": item.prompt.text, "response": item.response,
                           "response_ids": item.response_ids, "answer": item.prompt.answer,
                           "metadata": item.metadata})
        last: Exception | None = None
        for attempt in range(self.retries):
            try:
                async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(
                        total=self.timeout_s)) as session:
                    async with session.post(self.url, data=body, headers={
                            "Content-Type": "application/json"}) as resp:
                        text = await resp.text()
                        if resp.status == 200:
                            return json.loads(text)
                        last = RuntimeError(f"HTTP {resp.status}: {text[:300]}")
                        if resp.status != 429 and resp.status < 500:
                            raise last
            except (aiohttp.ClientError, asyncio.TimeoutError) as err:
                last = err
            if attempt + 1 < self.retries:
                await asyncio.sleep(min(4.0, 0.2 * 2 ** attempt) * random.uniform(0.8, 1.2))
        raise RuntimeError(f"no answer after {self.retries} attempt(s): {last!r}")


def import_callable(path: str, *, what: str) -> Callable:
    """``package.module:function`` -> the function, or a ValueError saying what is wrong."""
    module_name, sep, attr = path.partition(":")
    if not sep or not module_name or not attr:
        raise ValueError(f"{what}={path!r} must look like package.module:function")
    try:
        module = importlib.import_module(module_name)
    except ImportError as err:
        raise ValueError(f"{what}={path!r}: cannot import {module_name!r} ({err}); is it on "
                         f"PYTHONPATH?") from None
    fn = module
    for part in attr.split("."):
        fn = getattr(fn, part, None)
    if not callable(fn):
        raise ValueError(f"{what}={path!r}: {module_name} has no callable {attr!r}")
    return fn


def build_sources(spec: str, *, task: Task, batched: bool, retries: int,
                  timeout_s: float) -> list[RewardSource]:
    """The sources named by ``task.reward`` (see the module docstring)."""
    sources: list[RewardSource] = []
    for name in (part.strip() for part in spec.split(",")):
        if name == "builtin":
            sources.append(TaskVerifier(task))
        elif name == "math_verify":
            sources.append(MathVerify())
        elif name.startswith(("http://", "https://")):
            sources.append(RemoteReward(name, retries=retries, timeout_s=timeout_s))
        elif ":" in name:
            sources.append(ImportedFunction(name, batched=batched))
        else:
            raise ValueError(f"task.reward entry {name!r} is not builtin, math_verify, "
                             f"package.module:function or an http(s):// URL")
    return sources


# ============================================================================ scoring


def parse_outcome(value: Any) -> tuple[float, dict[str, float]]:
    """A reward's answer -> (score, numeric extras), or ValueError saying what is wrong."""
    extras: dict[str, float] = {}
    if isinstance(value, dict):
        if "score" not in value:
            raise ValueError(f"a reward dict needs a 'score' key, got keys {sorted(value)}")
        extras = {k: float(v) for k, v in value.items() if k != "score"
                  and isinstance(v, (int, float)) and not isinstance(v, bool)}
        value = value["score"]
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(
            value):
        raise ValueError(f"a reward must be a finite number, got {value!r}")
    return float(value), extras


class Scorer:
    """Scores samples with every source of ``task.reward`` under the error policy."""

    def __init__(self, sources: list[RewardSource], *, on_error: str, timeout_s: float,
                 concurrency: int):
        assert on_error in ("fail", "zero")
        self.sources, self.on_error = sources, on_error
        self.timeout_s, self.concurrency = timeout_s, concurrency

    def score(self, items: list[RewardItem]) -> Scores:
        from moerl.rollout.client import run_sync

        return run_sync(self.score_async(items))

    async def score_async(self, items: list[RewardItem]) -> Scores:
        semaphore = asyncio.Semaphore(self.concurrency)
        totals = [0.0] * len(items)
        extras: dict[str, list[float]] = defaultdict(list)
        metrics: dict[str, float] = {"reward/errors": 0.0}
        for source in self.sources:
            chunks = [items] if source.batched else [[item] for item in items]
            results = await asyncio.gather(*[self._call(source, chunk, semaphore)
                                             for chunk in chunks])
            values = [v for chunk_values in results for v in chunk_values]
            source_scores = []
            for i, (item, value) in enumerate(zip(items, values)):
                score, more = self._settle(source, item, value, metrics)
                totals[i] += score
                source_scores.append(score)
                for key, v in more.items():
                    extras[key].append(v)
            if len(self.sources) > 1:
                metrics[f"reward/{source.name}"] = sum(source_scores) / len(source_scores)
        metrics.update({f"reward/extra/{k}": sum(v) / len(v) for k, v in extras.items()})
        return Scores(totals, metrics)

    async def _call(self, source: RewardSource, chunk: list[RewardItem],
                    semaphore: asyncio.Semaphore) -> list:
        """The source's answers for ``chunk``, an exception in place of each failed one."""
        deadline = getattr(source, "deadline_s", self.timeout_s)
        try:
            async with semaphore:
                raw = await asyncio.wait_for(source(chunk, in_daemon_thread), deadline)
        except asyncio.TimeoutError:
            return [TimeoutError(f"no answer within {deadline:g}s (task.reward_timeout_s="
                                 f"{self.timeout_s:g})")] * len(chunk)
        except Exception as err:  # the user's code: any exception is that sample's error
            return [err] * len(chunk)
        if not source.batched:
            return [raw]
        if not isinstance(raw, (list, tuple)) or len(raw) != len(chunk):
            got = len(raw) if isinstance(raw, (list, tuple)) else type(raw).__name__
            return [ValueError(f"a batched reward must return a list of {len(chunk)} "
                               f"values, got {got}")] * len(chunk)
        return list(raw)

    def _settle(self, source: RewardSource, item: RewardItem, value: Any,
                metrics: dict) -> tuple[float, dict]:
        try:
            if isinstance(value, BaseException):
                raise value
            return parse_outcome(value)
        except Exception as err:
            message = (f"reward {source.name!r} failed on {item.label} (prompt "
                       f"{item.prompt.text[:80]!r}, response {item.response[:80]!r}): "
                       f"{type(err).__name__}: {err}")
            if self.on_error == "fail":
                raise RewardError(message + "; set task.reward_on_error=zero to score such "
                                  "samples 0 and count them instead") from err
            log.warning("%s: scored 0 (task.reward_on_error=zero)", message)
            metrics["reward/errors"] += 1
            return 0.0, {}



async def in_daemon_thread(fn: Callable, *args: Any) -> Any:
    """``fn(*args)`` in a fresh daemon thread: a reward that hangs past its timeout is abandoned
    and cannot keep the trainer from exiting (a thread pool's workers would be joined at exit)."""
    loop = asyncio.get_running_loop()
    future = loop.create_future()

    def settle(value: Any, error: BaseException | None) -> None:
        if not future.done():  # the caller may have timed out and gone
            future.set_exception(error) if error is not None else future.set_result(value)

    def work() -> None:
        try:
            outcome: tuple = (fn(*args), None)
        except BaseException as err:  # handed to the awaiting coroutine
            outcome = (None, err)
        try:
            loop.call_soon_threadsafe(settle, *outcome)
        except RuntimeError:
            pass  # the event loop is closed: nobody waits for this answer any more

    threading.Thread(target=work, name="moerl-reward", daemon=True).start()
    return await future


# ============================================================================ the RL loop's use


def score_samples(scorer: Scorer, task: Task, prompts: list[Prompt], samples: list, *,
                  offset: int, where: str) -> dict[str, float]:
    """Set ``reward`` on every sample (a ``moerl.batch.Sample`` of prompt
    ``prompts[s.group_index - offset]``); returns the reward metrics."""
    items = []
    for s in samples:
        prompt = prompts[s.group_index - offset]
        items.append(RewardItem(
            prompt=prompt, response=task.tokenizer.decode(s.response_ids),
            response_ids=list(s.response_ids),
            label=f"{where}, prompt {s.group_index}, sample {s.sample_index}",
            metadata={**prompt.meta, **s.extra.get("metadata", {})}))
    result = scorer.score(items)
    for s, score in zip(samples, result.scores):
        s.reward = score
    return result.metrics


def merge_metrics(rounds: list[dict[str, float]]) -> dict[str, float]:
    """Reward metrics of several scoring rounds: errors add up, the rest are averaged."""
    keys = sorted({k for r in rounds for k in r})
    merged = {k: [r[k] for r in rounds if k in r] for k in keys}
    return {k: sum(v) if k == "reward/errors" else sum(v) / len(v) for k, v in merged.items()}
