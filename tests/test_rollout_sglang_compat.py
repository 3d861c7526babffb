"""The client against recorded SGLang 0.5.23 responses, and (marked ``sglang``) moerl's payloads
checked with SGLang's own classes when the package is importable.

How the fixtures were built (by following SGLang 0.5.23's source; the script used SGLang's own
``SamplingMaskChunk`` from the wheel for the mask rows):

- The output dict is ``TokenizerManager._handle_batch_output``'s (``managers/tokenizer_manager.py``):
  ``{"text", "output_ids", "meta_info"}`` with ``meta_info`` keys in the order it sets them: ``id``,
  ``finish_reason`` (``FINISH_MATCHED_TOKEN.to_json()`` = ``{"type": "stop", "matched": id}``,
  ``FINISH_LENGTH.to_json()`` = ``{"type": "length", "length": n}``), ``prompt_tokens``,
  ``weight_version``, ``num_retractions``, then ``convert_logprob_style`` /
  ``add_logprob_to_meta_info``: ``input_token_logprobs`` (empty: ``logprob_start_len = -1`` becomes
  ``len(prompt)`` in ``Scheduler``), ``output_token_logprobs`` as ``detokenize_logprob_tokens``
  tuples ``(logprob, token_id, None)`` (JSON lists; float32 values widened to double),
  ``output_token_logprobs_length``; then the sampling mask from
  ``SamplingMaskChunk.to_lists(support_logprobs=mode == "support")`` (rows in descending
  probability, as ``Sampler._build_sampling_mask_output`` packs them with ``torch.topk(sorted=True)``)
  with ``output_token_sampling_mask_length``; ``reasoning_tokens``, ``completion_tokens``,
  ``cached_tokens``; ``weight_versions`` from ``add_weight_versions_to_meta_info``; and
  ``routed_experts`` = ``pybase64.b64encode(tensor.numpy().tobytes())`` of the int32
  ``[prompt + output - 1, num_hidden_layers, top_k]`` host-cache slice (``BaseTopkCapturer.get_topk``),
  zeros in the dense layer 0 (the buffer is zero-initialised; only MoE layers are captured).
- A: one request, ``n = 1``, top-k sampling, prompt of 4 tokens, stops on EOS id 2.
- B: ``n = 2`` greedy (``top_k = 1``) samples: a JSON list; greedy rows are ``[token]`` with
  log-prob 0 (``Sampler._build_greedy_sampling_mask_output``); a weight update happened after the
  first token, so ``weight_versions`` has two spans and ``weight_version`` is the last one.
- C: ``sampling_logprobs_mode = "support"``: one log-prob list per row, aligned with the ids.
- D: a request aborted by ``pause_generation(mode="abort")`` (``TokenizerManager._handle_abort_req``):
  no routes, no masks, ``finish_reason = {"type": "abort", "message": "Abort in waiting queue"}``.

The model is moerl's tiny Qwen3-MoE: 3 layers (layer 0 dense), 8 experts, top-2, vocabulary 64.
"""

import asyncio
import json
import threading

import numpy as np
import pytest
import torch
from aiohttp import web

from moerl.rollout import protocol as P
from moerl.rollout import schema
from moerl.rollout.client import RetryPolicy, RolloutClient, RolloutError

LAYOUT = P.MoeLayout(num_hidden_layers=3, moe_layers=(1, 2), num_experts=8, top_k=2,
                     vocab_size=64)

FIXTURE_A_JSON = (
    '{"text": "<generated>", "output_ids": [40, 12, 2], "meta_info": {"id": "5b7e6f0c2b8a4f2e9d'
    '1c0a7b6e5d4c3b", "finish_reason": {"type": "stop", "matched": 2}, "prompt_tokens": 4, "wei'
    'ght_version": "default", "num_retractions": 0, "input_token_logprobs": [], "output_token_l'
    'ogprobs": [[-2.3025851249694824, 40, null], [-1.8971198797225952, 12, null], [-0.916290700'
    '4356384, 2, null]], "output_token_logprobs_length": 3, "output_token_sampling_mask": [[40,'
    ' 12, 7, 3], [12, 40, 9], [2, 30]], "output_token_sampling_logprobs": [-1.0986123085021973,'
    ' -0.6931471824645996, -0.28768208622932434], "output_token_sampling_mask_length": 3, "reas'
    'oning_tokens": 0, "completion_tokens": 3, "cached_tokens": 0, "weight_versions": [{"versio'
    'n": "default", "start": 0, "end": 3}], "routed_experts": "AAAAAAAAAAAGAAAABQAAAAYAAAAEAAAA'
    'AAAAAAAAAAABAAAABQAAAAIAAAAHAAAAAAAAAAAAAAAAAAAABgAAAAUAAAABAAAAAAAAAAAAAAAAAAAAAwAAAAcAAA'
    'ACAAAAAAAAAAAAAAAFAAAAAgAAAAMAAAAHAAAAAAAAAAAAAAAEAAAABwAAAAYAAAAHAAAA", "e2e_latency": 0.'
    '0412}}'
)

FIXTURE_B_JSON = (
    '[{"text": "<generated>", "output_ids": [9, 9], "meta_info": {"id": "a1f0", "finish_reason"'
    ': {"type": "length", "length": 2}, "prompt_tokens": 3, "weight_version": "step-7", "num_re'
    'tractions": 0, "input_token_logprobs": [], "output_token_logprobs": [[-0.5108255743980408,'
    ' 9, null], [-0.41551539301872253, 9, null]], "output_token_logprobs_length": 2, "output_to'
    'ken_sampling_mask": [[9], [9]], "output_token_sampling_logprobs": [0.0, 0.0], "output_toke'
    'n_sampling_mask_length": 2, "reasoning_tokens": 0, "completion_tokens": 2, "cached_tokens"'
    ': 2, "weight_versions": [{"version": "step-6", "start": 0, "end": 1}, {"version": "step-7"'
    ', "start": 1, "end": 2}], "routed_experts": "AAAAAAAAAAAHAAAABAAAAAMAAAAGAAAAAAAAAAAAAAAFA'
    'AAAAQAAAAAAAAAEAAAAAAAAAAAAAAAAAAAAAwAAAAcAAAADAAAAAAAAAAAAAAAFAAAABwAAAAQAAAADAAAA", "e2e'
    '_latency": 0.0377}}, {"text": "<generated>", "output_ids": [9, 9], "meta_info": {"id": "a1'
    'f1", "finish_reason": {"type": "length", "length": 2}, "prompt_tokens": 3, "weight_version'
    '": "step-7", "num_retractions": 0, "input_token_logprobs": [], "output_token_logprobs": [['
    '-0.5108255743980408, 9, null], [-0.41551539301872253, 9, null]], "output_token_logprobs_le'
    'ngth": 2, "output_token_sampling_mask": [[9], [9]], "output_token_sampling_logprobs": [0.0'
    ', 0.0], "output_token_sampling_mask_length": 2, "reasoning_tokens": 0, "completion_tokens"'
    ': 2, "cached_tokens": 2, "weight_versions": [{"version": "step-6", "start": 0, "end": 1}, '
    '{"version": "step-7", "start": 1, "end": 2}], "routed_experts": "AAAAAAAAAAAHAAAABAAAAAMAA'
    'AAGAAAAAAAAAAAAAAAFAAAAAQAAAAAAAAAEAAAAAAAAAAAAAAAAAAAAAwAAAAcAAAADAAAAAAAAAAAAAAAFAAAABwA'
    'AAAQAAAADAAAA", "e2e_latency": 0.0377}}]'
)

FIXTURE_C_JSON = (
    '{"text": "<generated>", "output_ids": [6, 8], "meta_info": {"id": "c0ffee", "finish_reason'
    '": {"type": "length", "length": 2}, "prompt_tokens": 2, "weight_version": "default", "num_'
    'retractions": 1, "input_token_logprobs": [], "output_token_logprobs": [[-3.099999904632568'
    '4, 6, null], [-2.200000047683716, 8, null]], "output_token_logprobs_length": 2, "output_to'
    'ken_sampling_mask": [[5, 6], [8]], "output_token_sampling_logprobs": [[-0.2231436073780059'
    '8, -1.6094379425048828], [0.0]], "output_token_sampling_mask_length": 2, "reasoning_tokens'
    '": 0, "completion_tokens": 2, "cached_tokens": 0, "weight_versions": [{"version": "default'
    '", "start": 0, "end": 2}], "routed_experts": "AAAAAAAAAAABAAAABAAAAAUAAAAHAAAAAAAAAAAAAAAF'
    'AAAAAAAAAAAAAAABAAAAAAAAAAAAAAAFAAAABAAAAAUAAAAGAAAA", "e2e_latency": 0.02}}'
)

FIXTURE_D_JSON = (
    '{"text": "", "output_ids": [7], "meta_info": {"id": "dead", "finish_reason": {"type": "abo'
    'rt", "message": "Abort in waiting queue"}, "weight_version": "default", "e2e_latency": 0.0'
    '1, "weight_versions": [{"version": "default", "start": 0, "end": 1}], "input_token_logprob'
    's": [], "output_token_logprobs": [[-1.5, 7, null]], "output_token_logprobs_length": 1, "co'
    'mpletion_tokens": 1}}'
)
FIXTURES = {k: json.loads(v) for k, v in {"A": FIXTURE_A_JSON, "B": FIXTURE_B_JSON,
                                          "C": FIXTURE_C_JSON, "D": FIXTURE_D_JSON}.items()}
SGLANG_MODEL_INFO = {  # http_server.model_info() of SGLang 0.5.23: no MoE layout in it
    "model_path": "Qwen/tiny", "served_model_name": "Qwen/tiny", "tokenizer_path": "Qwen/tiny",
    "is_generation": True, "preferred_sampling_params": None, "weight_version": "default",
    "load_format": "auto", "reasoning_parser": None, "tool_call_parser": None,
    "disaggregation_mode": "null", "has_image_understanding": False,
    "has_audio_understanding": False, "model_type": "qwen3_moe",
    "architectures": ["Qwen3MoeForCausalLM"]}


class ReplayServer:
    """A loopback HTTP server that answers /generate with scripted SGLang responses and records
    the requests it got (the client under test speaks real HTTP to it)."""

    def __init__(self):
        self.script: list[tuple[int, object]] = []
        self.requests: list[dict] = []
        self._loop = asyncio.new_event_loop()
        self._ready = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        self._ready.wait(10)

    def _run(self):
        asyncio.set_event_loop(self._loop)
        app = web.Application()
        app.router.add_get("/model_info", self._model_info)
        app.router.add_post("/generate", self._generate)
        self._runner = web.AppRunner(app)
        self._loop.run_until_complete(self._runner.setup())
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        self._loop.run_until_complete(site.start())
        self.url = f"http://127.0.0.1:{self._runner.addresses[0][1]}"
        self._ready.set()
        self._loop.run_forever()

    async def _model_info(self, request):
        return web.json_response(SGLANG_MODEL_INFO)

    async def _generate(self, request):
        self.requests.append(await request.json())
        status, body = self.script.pop(0)
        return web.json_response(body, status=status)

    def close(self):
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(5)


@pytest.fixture(scope="module")
def replay():
    server = ReplayServer()
    yield server
    server.close()


FAST_RETRY = RetryPolicy(max_attempts=3, initial_backoff_s=0.01, max_backoff_s=0.02)


def test_client_decodes_sglang_single_response(replay):
    replay.script = [(200, FIXTURES["A"])]
    client = RolloutClient(replay.url, layout=LAYOUT, retry=FAST_RETRY)
    [s] = client.generate_sync([[1, 17, 33, 5]], n=1, sampling_params={
        "temperature": 1.0, "top_k": 4, "top_p": 0.9, "max_new_tokens": 8})
    body = replay.requests[-1]
    # The request uses SGLang's own field names; no moerl extension goes to a non-moerl server.
    assert body == {"input_ids": [1, 17, 33, 5], "sampling_params": {
        "temperature": 1.0, "top_k": 4, "top_p": 0.9, "max_new_tokens": 8, "n": 1},
        "return_logprob": True, "return_routed_experts": True, "return_sampling_mask": True}
    assert (s.group_index, s.sample_index, s.response_ids) == (0, 0, [40, 12, 2])
    assert s.finish_reason == "stop" and s.weight_version == "default"
    assert s.full_logprobs_R.tolist() == pytest.approx([-2.3025851, -1.8971199, -0.9162907])
    # Behaviour log-probs are the truncated-distribution ones when masks are returned.
    assert s.rollout_logprobs_R.tolist() == pytest.approx([-1.0986123, -0.6931472, -0.2876821])
    assert s.mask_ids_M.tolist() == [40, 12, 7, 3, 12, 40, 9, 2, 30]
    assert s.mask_offsets_R1.tolist() == [0, 4, 7, 9]
    assert s.routes_TLK.shape == (6, 3, 2) and s.routes_TLK.dtype == torch.uint8
    assert not s.routes_TLK[:, 0].any() and s.routes_TLK[:, 1:].ge(0).all()
    raw = np.frombuffer(__import__("base64").b64decode(FIXTURES["A"]["meta_info"][
        "routed_experts"]), "<i4").reshape(6, 3, 2)
    assert np.array_equal(s.routes_TLK.numpy(), raw)


def test_client_decodes_sglang_group_and_greedy_rows(replay):
    replay.script = [(200, FIXTURES["B"])]
    client = RolloutClient(replay.url, layout=LAYOUT, retry=FAST_RETRY)
    samples = client.generate_sync([[3, 4, 5]], n=2, group_index_offset=10,
                                   sampling_params={"temperature": 0.0, "max_new_tokens": 2})
    assert [(s.group_index, s.sample_index) for s in samples] == [(10, 0), (10, 1)]
    for s in samples:
        assert s.mask_ids_M.tolist() == [9, 9] and s.mask_offsets_R1.tolist() == [0, 1, 2]
        assert s.rollout_logprobs_R.tolist() == [0.0, 0.0]  # greedy: log-prob 0
        assert s.weight_version == "step-7" and len(s.extra["weight_versions"]) == 2
        assert s.finish_reason == "length"


def test_support_mode_picks_the_sampled_tokens_logprob():
    d = P.decode_generate_output(FIXTURES["C"], prompt_len=2, layout=LAYOUT, want_routes=True,
                                 want_mask=True)
    assert d.sampling_logprobs_R.tolist() == pytest.approx([-1.6094379, 0.0])
    assert d.routes_TLK.shape == (3, 3, 2)


def test_client_retries_aborted_and_5xx_then_keeps_exactly_one_answer(replay):
    replay.script = [(200, FIXTURES["D"]), (503, {"error": {"message": "busy"}}),
                     (200, FIXTURES["A"])]
    client = RolloutClient(replay.url, layout=LAYOUT, retry=FAST_RETRY)
    samples = client.generate_sync([[1, 17, 33, 5]], n=1)
    assert len(samples) == 1 and samples[0].response_ids == [40, 12, 2]
    assert len(replay.script) == 0


def test_client_does_not_retry_4xx_and_reports_sglangs_message(replay):
    message = ("return_sampling_mask requires top_k=1 for greedy sampling or finite 1 < top_k "
               "<= 4096; got top_k=1073741824. Lower top_k or increase --sampling-mask-max-tokens.")
    replay.script = [(400, {"error": {"message": message}}), (200, FIXTURES["A"])]
    client = RolloutClient(replay.url, layout=LAYOUT, retry=FAST_RETRY)
    with pytest.raises(RolloutError, match="Lower top_k") as info:
        client.generate_sync([[1, 17, 33, 5]])
    assert info.value.status == 400 and len(replay.script) == 1
    replay.script.clear()


def test_client_rejects_malformed_sglang_payloads(replay):
    bad = json.loads(json.dumps(FIXTURES["A"]))
    bad["meta_info"]["routed_experts"] = P.encode_routed_experts(np.zeros((5, 3, 2), np.int32))
    replay.script = [(200, bad)]
    client = RolloutClient(replay.url, layout=LAYOUT, retry=FAST_RETRY)
    with pytest.raises(P.WireFormatError, match="expected 144"):
        client.generate_sync([[1, 17, 33, 5]])


def test_client_needs_a_layout_for_sglang(replay):
    client = RolloutClient(replay.url, retry=FAST_RETRY)
    with pytest.raises(ValueError, match="MoeLayout.from_hf_config"):
        client.generate_sync([[1, 2]])
    replay.script = [(200, {**FIXTURES["A"], "meta_info": {
        **FIXTURES["A"]["meta_info"], "output_token_sampling_mask": None}})]
    plain = RolloutClient(replay.url, retry=FAST_RETRY).generate_sync(
        [[1, 17, 33, 5]], return_routes=False, return_sampling_mask=False)
    assert plain[0].routes_TLK is None and plain[0].mask_ids_M is None
    assert torch.equal(plain[0].rollout_logprobs_R, plain[0].full_logprobs_R)


# ------------------------------------------------------------------------------------------
# With SGLang importable: its own request/response classes judge moerl's payloads.
# ------------------------------------------------------------------------------------------


def _sglang(module: str):
    pytest.importorskip("sglang")
    return pytest.importorskip(module)


@pytest.mark.sglang
def test_fixtures_pass_sglangs_response_contract():
    api = _sglang("sglang.api.v1.api_types")
    for name, fixture in FIXTURES.items():
        for out in fixture if isinstance(fixture, list) else [fixture]:
            decoded = api.GenerateResponse.from_json_value(out)
            assert decoded.output_ids == out["output_ids"], name


@pytest.mark.sglang
def test_fixture_masks_are_sglangs_own_chunk_encoding():
    mask = _sglang("sglang.srt.sampling.sampling_mask")
    rows = FIXTURES["A"]["meta_info"]["output_token_sampling_mask"]
    chunk = mask.SamplingMaskChunk(
        lengths=np.array([len(r) for r in rows], np.int32),
        token_ids=np.array([t for r in rows for t in r], np.int32),
        logprobs=np.array(FIXTURES["A"]["meta_info"]["output_token_sampling_logprobs"],
                          np.float32))
    assert chunk.to_lists(support_logprobs=False) == (
        rows, FIXTURES["A"]["meta_info"]["output_token_sampling_logprobs"])


@pytest.mark.sglang
def test_client_requests_pass_sglangs_request_contract(replay):
    api = _sglang("sglang.api.v1.api_types")
    sp_mod = _sglang("sglang.srt.sampling.sampling_params")
    replay.script = [(200, FIXTURES["B"])]
    RolloutClient(replay.url, layout=LAYOUT, retry=FAST_RETRY).generate_sync(
        [[3, 4, 5]], n=2, seed=3, sampling_params={"temperature": 0.0, "max_new_tokens": 2})
    body = replay.requests[-1]
    api.GenerateRequest.from_json_value(body)
    for sp in body["sampling_params"]:
        params = sp_mod.SamplingParams(**sp)
        params.verify(64)
        mine, _ = schema.parse_sampling_params(sp, prompt_len=3, limits=schema.Limits(
            vocab_size=64, context_length=512, sampling_mask_max_tokens=4096))
        # SGLang's normalisation (temperature 0 -> greedy top_k 1, temperature 1) is moerl's.
        assert (params.top_k, params.temperature) == (mine.top_k, mine.temperature)


@pytest.mark.sglang
def test_unknown_sampling_key_error_text_matches_sglang():
    api = _sglang("sglang.api.v1.api_types")
    with pytest.raises(api.JsonContractError) as theirs:
        api.SamplingParams.from_json_value({"temprature": 1.0})
    with pytest.raises(schema.RequestError) as ours:
        schema.parse_sampling_params({"temprature": 1.0}, prompt_len=1, limits=schema.Limits(
            vocab_size=64, context_length=512, sampling_mask_max_tokens=4096))
    assert str(ours.value) == "sampling_params: " + str(theirs.value)
    with pytest.raises(api.JsonContractError) as theirs:
        api.SamplingParams.from_json_value({"top_k": "x"})
    with pytest.raises(schema.RequestError) as ours:
        schema.parse_sampling_params({"top_k": "x"}, prompt_len=1, limits=schema.Limits(
            vocab_size=64, context_length=512, sampling_mask_max_tokens=4096))
    assert str(ours.value) == "sampling_params.top_k: " + str(theirs.value)


@pytest.mark.sglang
def test_flattened_bucket_layout_matches_sglangs():
    bucket_mod = _sglang("sglang.srt.weight_sync.tensor_bucket")
    from moerl.rollout.weight_sync import FLATTENED_BUCKET, validate_tensor_metadata

    named = [("a.weight", torch.randn(3, 4)), ("b.weight", torch.randn(5)),
             ("c.weight", torch.randn(2, 2).to(torch.bfloat16))]
    names, dtypes = [n for n, _ in named], [str(t.dtype)[6:] for _, t in named]
    shapes = [list(t.shape) for _, t in named]
    validate_tensor_metadata(names, dtypes, shapes, load_format=FLATTENED_BUCKET)
    # What moerl's trainer broadcasts for a bucket ...
    ours = torch.cat([t.reshape(-1).view(torch.uint8) for _, t in named])
    # ... is what SGLang's sender would flatten, and SGLang's receiver rebuilds the tensors.
    theirs = bucket_mod.FlattenedTensorBucket(named_tensors=named).get_flattened_tensor()
    assert torch.equal(ours, theirs)
    receiver = bucket_mod.FlattenedTensorBucket.empty(names, dtypes, shapes, "cpu")
    receiver.get_flattened_tensor().copy_(ours)
    for (name, t), (rname, rt) in zip(named, receiver.reconstruct_tensors()):
        assert name == rname and torch.equal(t, rt)


# ------------------------------------------------------------------------------------------
# launch/sglang_server.sh
# ------------------------------------------------------------------------------------------

REPO = __import__("pathlib").Path(__file__).resolve().parents[1]
STUB_PYTHON = """#!/usr/bin/env bash
# Stands in for python: the version probe succeeds, a launch prints its arguments.
if [[ "$1" == "-c" ]]; then exit 0; fi
printf '%s\\n' "$@"
"""


def run_launch_script(tmp_path, *args, **env):
    import os
    import subprocess

    stub = tmp_path / "python"
    stub.write_text(STUB_PYTHON)
    stub.chmod(0o755)
    full_env = {**os.environ, "PYTHON": str(stub), "MODEL": "/models/qwen3-moe", **env}
    full_env.pop("MOERL_ROLLOUT_API_KEY", None)
    full_env.update(env)
    return subprocess.run(["bash", str(REPO / "launch/sglang_server.sh"), *args], env=full_env,
                          capture_output=True, text=True, timeout=30)


def test_launch_script_turns_on_routes_masks_and_logical_expert_ids(tmp_path):
    out = run_launch_script(tmp_path, "--log-level", "info", MOERL_ROLLOUT_API_KEY="k3y", TP="4")
    assert out.returncode == 0, out.stderr
    argv = out.stdout.split("\n")[:-1]
    flags = dict(zip(argv, argv[1:]))
    assert argv[:2] == ["-m", "sglang.launch_server"]
    assert "--enable-return-routed-experts" in argv and "--skip-tokenizer-init" in argv
    assert flags["--sampling-mask-max-tokens"] == "4096" and flags["--tp-size"] == "4"
    assert flags["--ep-num-redundant-experts"] == "0"
    assert flags["--init-expert-location"] == "trivial"
    assert flags["--disaggregation-mode"] == "null" and "--enable-eplb" not in argv
    assert flags["--api-key"] == "k3y" and "k3y" not in out.stderr  # the echo masks the key
    assert argv[-2:] == ["--log-level", "info"]


@pytest.mark.parametrize("bad", ["--enable-eplb", "--ep-num-redundant-experts=8",
                                 "--disaggregation-mode=prefill"])
def test_launch_script_refuses_what_breaks_keep_routing(tmp_path, bad):
    out = run_launch_script(tmp_path, bad)
    assert out.returncode == 2 and "KEEP_ROUTING=1" in out.stderr
    assert run_launch_script(tmp_path, bad, KEEP_ROUTING="0").returncode == 0


@pytest.mark.sglang
def test_launch_script_arguments_parse_with_sglangs_own_parser(tmp_path):
    import argparse

    server_args = _sglang("sglang.srt.server_args")
    argv = run_launch_script(tmp_path).stdout.split("\n")[:-1][2:]  # drop "-m module"
    parser = argparse.ArgumentParser()
    server_args.ServerArgs.add_cli_args(parser)
    ns = parser.parse_args(argv)
    assert ns.enable_return_routed_experts and ns.sampling_mask_max_tokens == 4096
