"""The user-style end to end of bringing your own data, rewards and rollouts, at TP=2/EP=2 on
CPU: a Parquet dataset rendered with a real HF tokenizer's chat template, an import-path reward
plus a remote reward server on localhost, a two-turn custom rollout with keep-routing and the
keep-sampling-mask, pass@k evaluation, W&B in offline mode, per-step sample dumps, then
``moerl export`` of step 2 and ``moerl plot``. And the reward error paths in a real run."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import pytest
from safetensors.torch import load_file

from byo_util import RewardServer, chat_tokenizer, problems
from e2e_util import REPO, fast_overrides, finite, read_metrics, run, torchrun

TESTS = str(REPO / "tests")
ENV = {"PYTHONPATH": TESTS + os.pathsep + os.environ.get("PYTHONPATH", ""),
       "WANDB_SILENT": "true"}


@pytest.fixture(scope="module")
def byo_model(model_dir, tmp_path_factory):
    """The tiny model with a word-level chat tokenizer, and a Parquet dataset for it."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    root = tmp_path_factory.mktemp("byo")
    model = root / "model"
    shutil.copytree(model_dir, model)
    chat_tokenizer(model)
    pq.write_table(pa.Table.from_pylist(problems(40)), root / "train.parquet")
    return model, root / "train.parquet"


def byo_overrides(model, data, out, **extra):
    return ["configs/grpo.yaml", "--keep-routing", "--keep-sampling-mask", *fast_overrides(
        model, out, **{"training.steps": 2, "training.checkpoint_every": 2,
                       "training.eval_every": 2, "rollout.max_new_tokens": 16,
                       "rollout.top_p": 0.9, "task.name": "dataset", "task.path": data,
                       "task.prompt_field": "question", "task.answer_field": "label",
                       "task.system_prompt": "be brief", "task.eval_size": 4,
                       "task.eval_k": 2, "rollout.generate": "byo.toy_env:two_turns", **extra})]


@pytest.mark.slow
def test_bring_your_own_everything(byo_model, tmp_path):
    model, data = byo_model
    server = RewardServer()
    out = tmp_path / "run"
    try:
        torchrun(byo_overrides(model, data, out, **{
            "task.reward": f"byo.toy_env:length_reward,{server.url}",
            "logging.wandb": "true", "logging.sample_dumps": "true"}), timeout=600, env=ENV)
    finally:
        server.close()
    records = read_metrics(out)
    assert [r["step"] for r in records] == [0, 1, 2]
    for r in records[:2]:
        # Multi-turn samples with environment tokens, routes replayed (R3) and the sampler's
        # mask applied: the fp32 trainer reproduces the engine's log-probs on every policy
        # token, which it cannot unless tokens, loss mask, routes and masks line up.
        assert r["mismatch/abs_max"] < 1e-4, r["mismatch/abs_max"]
        assert r["reward/extra/turns"] == 2 and r["reward/errors"] == 0
        assert finite(r["reward/byo.toy_env:length_reward"]) and finite(
            r[f"reward/{server.url}"])
        assert finite(r["loss"]) and finite(r["grad_norm"])
    for r in (records[0], records[2]):
        assert 0 <= r["eval/pass@2"] <= 1 and 0 <= r["eval/mean@2"] <= 1
        assert finite(r["eval/accuracy"])
    # 2 steps x 4 prompts x 4 samples, and 2 evaluations x 4 prompts x (1 greedy + 2 samples).
    assert server.requests == 2 * 16 + 2 * 4 * 3
    check_sample_dumps(out)
    check_wandb(out)
    exported = tmp_path / "exported"
    run([sys.executable, "-m", "moerl.cli", "export", str(out), "--step", "2", "--out",
         str(exported)], timeout=300)
    final, saved = load_file(out / "hf" / "model.safetensors"), load_file(
        exported / "model.safetensors")
    assert saved.keys() == final.keys() and all(saved[k].equal(final[k]) for k in final)
    assert (exported / "tokenizer_config.json").is_file()
    run([sys.executable, "-m", "moerl.cli", "plot", str(out)], timeout=120)
    assert (out / "metrics.png").stat().st_size > 10_000


def check_sample_dumps(out):
    lines = (out / "samples" / "step_000001.jsonl").read_text().splitlines()
    assert len(lines) == 16
    for record in map(json.loads, lines):
        assert record["prompt"].startswith("system be brief user what is")
        assert "tool try again" in record["response"]  # the environment's turn, in the text
        assert record["policy_tokens"] < record["response_tokens"]  # ... but out of the loss
        assert record["mismatch_abs_max"] < 1e-4
        assert finite(record["reward"]) and finite(record["advantage"])


def check_wandb(out):
    """The offline run's record file holds the run config and the logged metrics (its records
    are protobuf; the config values and metric names are stored as plain JSON/UTF-8 inside)."""
    runs = list((out / "wandb").glob("offline-run-*"))
    assert len(runs) == 1
    [record_file] = runs[0].glob("run-*.wandb")
    raw = record_file.read_bytes()
    assert b"byo.toy_env:two_turns" in raw and b"keep_sampling_mask" in raw  # the config
    assert b"mismatch/abs_max" in raw and b"eval/pass@2" in raw  # the metrics


@pytest.mark.parametrize("policy", ["fail", "zero"])
def test_a_failing_reward_in_a_run(byo_model, tmp_path, policy):
    """A reward that raises on some samples: the run fails naming the sample, or scores those
    samples 0 and counts them."""
    model, data = byo_model
    out = tmp_path / "run"
    proc = torchrun(byo_overrides(model, data, out, **{
        "task.reward": "byo.toy_env:flaky_reward", "task.reward_on_error": policy,
        "training.steps": 1, "training.eval_every": 0, "task.eval_k": 0}),
        timeout=600, env=ENV, check=policy == "zero")
    if policy == "fail":
        assert proc.returncode != 0
        assert ("reward 'byo.toy_env:flaky_reward' failed on step 0, prompt" in proc.stderr
                and "ValueError: cannot score a response that starts with an odd token id" in proc.stderr
                and "set task.reward_on_error=zero" in proc.stderr), proc.stderr[-3000:]
    else:
        [record] = read_metrics(out)
        assert 0 < record["reward/errors"] < 16 and "scored 0" in proc.stdout + proc.stderr


def test_a_bad_reward_path_fails_at_start_up(byo_model, tmp_path):
    model, data = byo_model
    proc = subprocess.run(
        [sys.executable, "-m", "moerl.cli", "train",
         *byo_overrides(model, data, tmp_path / "run", **{"task.reward": "byo.nowhere:f"})],
        cwd=REPO, capture_output=True, text=True, timeout=600, env={**os.environ, **ENV,
                                                                   "OMP_NUM_THREADS": "1"})
    assert proc.returncode != 0
    assert "task.reward='byo.nowhere:f': cannot import 'byo.nowhere'" in proc.stderr
