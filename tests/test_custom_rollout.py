"""Custom rollouts against the real built-in server: a two-turn toy environment, and that the
tokens, loss mask, log-probs, sampling-mask rows and routes of the sample line up across turns,
also once packed into the trainer's batch."""

import pytest
import torch

from byo.toy_env import FEEDBACK, two_turns
from byo_util import chat_tokenizer
from moerl.batch import pack_samples
from moerl.custom_rollout import CustomRollout, RolloutSession
from moerl.rollout.client import RolloutClient
from moerl.rollout.protocol import MoeLayout
from moerl.rollout.server import launch_server
from moerl.rollout_manager import RolloutManager, SamplingSettings
from moerl.tasks.base import Prompt
from moerl.tasks.math_jsonl import HFTokenizer


@pytest.fixture(scope="module")
def served(model_dir):
    chat_tokenizer(model_dir)
    handle = launch_server(model_dir, num_threads=1, max_batch_size=8)
    yield handle, HFTokenizer(str(model_dir))
    handle.kill()


def manager_for(handle, model_dir):
    """A RolloutManager on an already running server (no weight pushes in this test)."""
    import json

    sampling = SamplingSettings(temperature=1.0, top_p=0.9, top_k=-1, min_p=0.0,
                                max_new_tokens=24, stop_token_ids=(2,))
    layout = MoeLayout.from_hf_config(json.loads((model_dir / "config.json").read_text()))
    m = RolloutManager(builtin=False, url=handle.url, api_key=handle.api_key,
                       engine_dtype="float32", concurrency=4, timeout_s=120, max_retries=2,
                       seed=5, sampling=sampling, layout=layout, return_routes=True,
                       require_routes=True, return_mask=True, require_mask=True,
                       sync_method="disk", bucket_mb=1, sync_address="", sync_port=0,
                       run_dir=model_dir, hf_config_dir=str(model_dir))
    m.start(model_dir, version="")
    return m


def test_two_turn_sample_lines_up(served, model_dir):
    handle, tok = served
    manager = manager_for(handle, model_dir)
    prompt_ids = tok.render([{"role": "user", "content": "what is 3 plus 4 ?"}])[1]
    prompts = [Prompt(ids=tuple(prompt_ids), text="", answer="7")]
    rollout = CustomRollout("byo.toy_env:two_turns", tokenizer=tok, concurrency=4)
    samples = rollout.generate(manager, prompts, n=3, step=0)
    again = rollout.generate(manager, prompts, n=3, step=0)
    assert [s.response_ids for s in again] == [s.response_ids for s in samples]  # seeded
    assert [(s.group_index, s.sample_index) for s in samples] == [(0, 0), (0, 1), (0, 2)]
    feedback = tok.encode(FEEDBACK)
    for s in samples:
        assert s.extra["metadata"]["turns"] == 2 and s.extra["turns"] == 2
        n1 = s.extra["metadata"]["first_turn_tokens"]
        p, r = len(s.prompt_ids), len(s.response_ids)
        assert s.prompt_ids == prompt_ids and r <= 24
        # turn 1 | environment | turn 2: the loss mask marks exactly the policy's tokens
        assert s.response_ids[n1:n1 + len(feedback)] == feedback
        expected_mask = [True] * n1 + [False] * len(feedback) + [True] * (r - n1 - len(feedback))
        assert s.loss_mask_R.tolist() == expected_mask
        env = ~s.loss_mask_R
        assert (s.rollout_logprobs_R[env] == 0).all() and (s.rollout_logprobs_R[~env] < 0).all()
        lengths = s.mask_offsets_R1[1:] - s.mask_offsets_R1[:-1]
        assert (lengths[env] == 0).all() and (lengths[~env] > 0).all()
        for i in torch.nonzero(~env).flatten().tolist():  # the sampled token is in its row
            row = s.mask_ids_M[s.mask_offsets_R1[i]:s.mask_offsets_R1[i + 1]]
            assert s.response_ids[i] in row.tolist()
        check_routes_against_one_prefill(handle, s, p + r)


def check_routes_against_one_prefill(handle, sample, length):
    """Route row t must be position t's routing: compare with a single forward over the whole
    sequence. The same fp32 model routes each position identically whether it was decoded or
    prefilled (up to near-ties), while a one-row misalignment agrees on almost nothing."""
    client = RolloutClient(handle.url, api_key=handle.api_key)
    tokens = sample.prompt_ids + sample.response_ids
    [ref] = client.generate_sync([tokens], n=1, sampling_params={
        "temperature": 0.0, "max_new_tokens": 1}, return_sampling_mask=False)
    assert sample.routes_TLK.shape == (length - 1, 3, 2)
    moe = [1, 2]  # layer 0 is dense
    mine = sample.routes_TLK[:, moe].sort(-1).values
    full = ref.routes_TLK[:length - 1, moe].sort(-1).values
    agree = (mine == full).all(-1).float().mean().item()
    shifted = (mine[1:] == full[:-1]).all(-1).float().mean().item()
    assert agree >= 0.98 and shifted < 0.6, (agree, shifted)


def test_packed_batch_keeps_environment_tokens_out_of_the_loss(served, model_dir):
    handle, tok = served
    manager = manager_for(handle, model_dir)
    prompt = Prompt(ids=tuple(tok.render([{"role": "user", "content": "what is 1 plus 2 ?"}])[1]),
                    text="", answer="3")
    samples = CustomRollout("byo.toy_env:two_turns", tokenizer=tok, concurrency=4).generate(
        manager, [prompt], n=2, step=1)
    batch = pack_samples(samples, pad_id=0, pad_multiple=2)
    for b, s in enumerate(samples):
        p, r = len(s.prompt_ids), len(s.response_ids)
        # column t predicts token t + 1: response token i sits in column p - 1 + i
        assert batch.response_mask_BT[b, p - 1:p - 1 + r].tolist() == s.loss_mask_R.tolist()
        assert batch.response_mask_BT[b].sum() == s.loss_mask_R.sum()
        assert batch.rollout_logprobs_BT[b, p - 1:p - 1 + r].equal(s.rollout_logprobs_R)
        assert batch.targets_BT[b, p - 1:p - 1 + r].tolist() == s.response_ids


def test_session_errors(served, model_dir):
    handle, tok = served
    session = RolloutSession(client=RolloutClient(handle.url, api_key=handle.api_key),
                             prompt_ids=[1, 4], tokenizer=tok, sampling_params={}, seed=None,
                             group_index=0, sample_index=0, max_new_tokens=4,
                             return_routes=False, return_mask=False)
    with pytest.raises(ValueError, match="outside the tokenizer's vocabulary"):
        session.append([5, 64])
    with pytest.raises(ValueError, match="5 tokens exceed the 4 left"):
        session.append([5] * 5)
    with pytest.raises(ValueError, match="returned without calling session.generate"):
        session.to_sample(None)
    with pytest.raises(ValueError, match="must be an async function"):
        CustomRollout("byo.toy_env:length_reward", tokenizer=tok, concurrency=1)


def test_a_failing_custom_rollout_names_the_sample(served, model_dir):
    handle, tok = served
    manager = manager_for(handle, model_dir)
    prompt = Prompt(ids=(4, 7, 9), text="", answer="")
    with pytest.raises(RuntimeError, match=r"rollout.generate='byo.toy_env:broken_env' raised "
                                           r"on prompt 3, sample 1: KeyError"):
        CustomRollout("byo.toy_env:broken_env", tokenizer=tok, concurrency=2).generate(
            manager, [prompt], n=2, step=0, group_offset=3)
