"""Bring your own rewards: import paths (float, dict with extras, batched, async), math-verify,
a remote reward server (retries, timeouts, bounded concurrency), and the error policy."""

import sys
import textwrap

import pytest

from byo_util import RewardServer
from moerl.rewards import RewardError, RewardItem, Scorer, build_sources, merge_metrics
from moerl.tasks.arithmetic import ArithmeticTask
from moerl.tasks.base import Prompt

USER_MODULE = '''
import asyncio, time

def exact(prompt, response, *, response_ids, answer, metadata):
    return float(response.strip() == answer)

def with_extras(prompt, response, *, response_ids, answer, metadata):
    return {"score": float(response.strip() == answer), "length": len(response_ids),
            "bonus": metadata["bonus"], "note": "not a number: not logged"}

def batched(prompts, responses, *, response_ids, answer, metadata):
    return [float(r.strip() == a) for r, a in zip(responses, answer)]

import threading
in_flight = {"now": 0, "max": 0}
_lock = threading.Lock()

def _enter():
    with _lock:
        in_flight["now"] += 1
        in_flight["max"] = max(in_flight["max"], in_flight["now"])

def _leave():
    with _lock:
        in_flight["now"] -= 1

async def slow_async(prompt, response, *, response_ids, answer, metadata):
    _enter()
    await asyncio.sleep(metadata["delay"])
    _leave()
    return 1.0

def slow_sync(prompt, response, *, response_ids, answer, metadata):
    _enter()
    time.sleep(metadata["delay"])
    _leave()
    return 0.5

def raises(prompt, response, *, response_ids, answer, metadata):
    if metadata["bonus"] > 1:
        raise KeyError("no verifier for this one")
    return 1.0

def nan(prompt, response, *, response_ids, answer, metadata):
    return float("nan")

def wrong_length(prompts, responses, **_):
    return [1.0]

def no_score(prompt, response, **_):
    return {"accuracy": 1.0}
'''


@pytest.fixture(scope="module", autouse=True)
def user_module(tmp_path_factory):
    root = tmp_path_factory.mktemp("user")
    (root / "my_rewards.py").write_text(textwrap.dedent(USER_MODULE))
    sys.path.insert(0, str(root))
    yield
    sys.path.remove(str(root))
    sys.modules.pop("my_rewards", None)


def items(responses, *, answer="5", **meta):
    return [RewardItem(prompt=Prompt(ids=(1,), text="2+3=", answer=answer, meta={}),
                       response=r, response_ids=list(range(len(r))),
                       label=f"step 0, prompt 0, sample {i}", metadata={"bonus": i, **meta})
            for i, r in enumerate(responses)]


def scorer(spec, *, on_error="fail", timeout_s=10.0, concurrency=4, batched=False, retries=3):
    sources = build_sources(spec, task=ArithmeticTask(), batched=batched, retries=retries,
                            timeout_s=timeout_s)
    return Scorer(sources, on_error=on_error, timeout_s=timeout_s, concurrency=concurrency)


def test_import_path_float_and_dict_with_extras():
    assert scorer("my_rewards:exact").score(items(["5", "6", " 5 "])).scores == [1.0, 0.0, 1.0]
    result = scorer("my_rewards:with_extras").score(items(["5", "6", "77"]))
    assert result.scores == [1.0, 0.0, 0.0]
    assert result.metrics == {"reward/errors": 0.0, "reward/extra/length": 4 / 3,
                              "reward/extra/bonus": 1.0}


def test_batched_and_summed_sources():
    result = scorer("my_rewards:batched", batched=True).score(items(["5", "4"]))
    assert result.scores == [1.0, 0.0]
    summed = scorer("my_rewards:exact, my_rewards:with_extras").score(items(["5", "4"]))
    assert summed.scores == [2.0, 0.0]
    assert summed.metrics["reward/my_rewards:exact"] == 0.5


@pytest.mark.parametrize("spec, score", [("my_rewards:slow_async", 1.0),
                                         ("my_rewards:slow_sync", 0.5)])
def test_async_and_threaded_rewards_overlap_up_to_the_concurrency_bound(spec, score):
    import my_rewards

    for concurrency in (6, 2):
        my_rewards.in_flight["max"] = 0
        result = scorer(spec, concurrency=concurrency).score(items(["5"] * 6, delay=0.3))
        assert result.scores == [score] * 6
        assert my_rewards.in_flight["max"] == concurrency


def test_builtin_and_math_verify():
    task = ArithmeticTask()
    prompt = task.prompts(0, 1)[0]
    right = task.tokenizer.encode(prompt.answer) + [2]
    item = RewardItem(prompt=prompt, response=prompt.answer, response_ids=right, label="s")
    assert scorer("builtin").score([item]).scores == [1.0]
    mv = scorer("math_verify", timeout_s=120.0)  # its first call builds its parsers
    p = Prompt(ids=(1,), text="q", answer="x(x+2)")
    graded = mv.score([RewardItem(prompt=p, response=r, response_ids=[], label=f"s{i}")
                       for i, r in enumerate(["so $x^2+2x$", "\\boxed{x^2+2x}", "x^2"])])
    assert graded.scores == [1.0, 1.0, 0.0]  # symbolic equality, which the exact checker lacks


@pytest.mark.parametrize("spec, match", [
    ("my_rewards:raises", r"reward 'my_rewards:raises' failed on step 0, prompt 0, sample 2 "
                          r"\(prompt '2\+3=', response 'c'\): KeyError"),
    ("my_rewards:nan", "sample 0 .*a reward must be a finite number, got nan"),
    ("my_rewards:no_score", "sample 0 .*needs a 'score' key"),
])
def test_fail_policy_names_the_sample(spec, match):
    with pytest.raises(RewardError, match=match):
        scorer(spec).score(items(["a", "b", "c"]))


def test_zero_policy_scores_zero_counts_and_warns(caplog):
    result = scorer("my_rewards:raises", on_error="zero").score(items(["a", "b", "c", "d"]))
    assert result.scores == [1.0, 1.0, 0.0, 0.0]
    assert result.metrics["reward/errors"] == 2
    assert "failed on step 0, prompt 0, sample 3" in caplog.text
    batched = scorer("my_rewards:wrong_length", batched=True, on_error="zero").score(
        items(["a", "b"]))
    assert batched.scores == [0.0, 0.0] and batched.metrics["reward/errors"] == 2
    assert merge_metrics([result.metrics, batched.metrics])["reward/errors"] == 4


def test_timeouts_are_errors_too():
    with pytest.raises(RewardError, match=r"sample 0 .*no answer within 0.2s "
                                          r"\(task.reward_timeout_s=0.2\)"):
        scorer("my_rewards:slow_async", timeout_s=0.2).score(items(["5"], delay=5))
    result = scorer("my_rewards:slow_sync", timeout_s=0.2, on_error="zero").score(
        items(["5"], delay=1))
    assert result.scores == [0.0] and result.metrics["reward/errors"] == 1


@pytest.mark.parametrize("spec, match", [
    ("nope", "is not builtin, math_verify, package.module:function or an http"),
    ("no_such_module:f", "cannot import 'no_such_module'"),
    ("my_rewards:missing", "has no callable 'missing'"),
])
def test_bad_reward_specs(spec, match):
    with pytest.raises(ValueError, match=match):
        scorer(spec)


def test_remote_reward_retries_and_bounds_concurrency():
    server = RewardServer(fail_first=3, delay=0.1)
    try:
        result = scorer(server.url, concurrency=2, retries=5).score(items(["5", "6"] * 4))
        assert result.scores == [1.0, 0.0] * 4
        assert result.metrics["reward/extra/tokens"] == 1.0
        assert server.requests == 8 + 3 and server.max_in_flight == 2
    finally:
        server.close()


def test_remote_reward_timeouts_and_exhausted_retries():
    slow = RewardServer(delay=2.0)
    try:
        with pytest.raises(RewardError, match="sample 0 .*no answer"):
            scorer(slow.url, timeout_s=0.3, retries=1).score(items(["5"]))
    finally:
        slow.close()
    down = RewardServer(fail_first=100)
    try:
        with pytest.raises(RewardError, match=r"no answer after 2 attempt\(s\).*HTTP 503"):
            scorer(down.url, retries=2).score(items(["5"]))
    finally:
        down.close()


def test_a_hung_reward_does_not_keep_the_process_alive(tmp_path):
    """A synchronous reward stuck far past its timeout is scored 0 and abandoned: the process
    still exits (a hang here fails the test through the subprocess timeout)."""
    import subprocess

    script = textwrap.dedent(f"""
        import sys, time
        sys.path.insert(0, {str(tmp_path)!r})
        from moerl.rewards import RewardItem, Scorer, build_sources
        from moerl.tasks.arithmetic import ArithmeticTask
        from moerl.tasks.base import Prompt
        sources = build_sources("stuck:reward", task=ArithmeticTask(), batched=False, retries=1,
                                timeout_s=0.5)
        item = RewardItem(prompt=Prompt(ids=(1,), text="q", answer="1"), response="1",
                          response_ids=[5], label="sample 0")
        print(Scorer(sources, on_error="zero", timeout_s=0.5, concurrency=1).score([item]))
    """)
    (tmp_path / "stuck.py").write_text("import time\ndef reward(*a, **k):\n    time.sleep(3600)\n")
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "scores=[0.0]" in proc.stdout and "'reward/errors': 1.0" in proc.stdout
