"""The built-in server as a real subprocess on loopback: numerics against a direct Hugging Face
forward pass, batching invariance, seeds, SGLang-shaped errors for bad requests, auth, pause."""

import json
import threading
import time
import urllib.error
import urllib.request

import pytest
import torch

from moerl.rollout.client import RetryPolicy, RolloutClient, run_sync
from moerl.rollout.server import launch_server

pytestmark = pytest.mark.usefixtures("one_torch_thread")

TEMPERATURE = 0.8


@pytest.fixture(scope="module")
def server(model_dir):
    handle = launch_server(model_dir, num_threads=1, max_batch_size=16,
                           extra_args=("--max-request-mb", "1"))
    yield handle
    handle.stop()


@pytest.fixture(scope="module")
def hf_model(model_dir):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()


@pytest.fixture
def client(server):
    return RolloutClient(server.url, api_key=server.api_key, concurrency=8)


def post(server, path, body=None, *, raw=None, key="server", method="POST"):
    """One raw HTTP request; returns (status, parsed JSON or text)."""
    data = raw if raw is not None else (None if body is None else json.dumps(body).encode())
    headers = {"Content-Type": "application/json"}
    key = server.api_key if key == "server" else key
    if key:
        headers["Authorization"] = f"Bearer {key}"
    req = urllib.request.Request(server.url + path, data=data, headers=headers, method=method)
    try:
        with urllib.request.urlopen(req, timeout=60) as r:
            status, payload = r.status, r.read()
    except urllib.error.HTTPError as e:
        status, payload = e.code, e.read()
    try:
        return status, json.loads(payload)
    except ValueError:
        return status, payload.decode()


PROMPTS = [[1, 5, 9, 13], [1, 7], [1, 20, 21, 22, 23, 24, 25, 26], [1, 3, 3]]


def reference(hf_model, sample, temperature):
    """Full-vocabulary and kept-set log-probs of the sampled tokens from one HF forward pass,
    and the top-k of the router logits (router_logits: one [T, E] tensor per MoE layer)."""
    seq = sample.prompt_ids + sample.response_ids
    P, R = len(sample.prompt_ids), len(sample.response_ids)
    with torch.no_grad():
        out = hf_model(input_ids=torch.tensor([seq]), output_router_logits=True)
    z_RV = out.logits[0, P - 1:P - 1 + R].float() / temperature
    y_R = torch.tensor(sample.response_ids)
    full_R = torch.log_softmax(z_RV, -1).gather(1, y_R[:, None]).squeeze(1)
    offsets = sample.mask_offsets_R1
    kept_R = []
    for r in range(R):
        ids = sample.mask_ids_M[offsets[r]:offsets[r + 1]].long()
        ids = torch.arange(z_RV.shape[1]) if ids.numel() == 0 else ids
        kept_R.append(z_RV[r, y_R[r]] - torch.logsumexp(z_RV[r, ids], 0))
    return full_R, torch.stack(kept_R), [rl.float() for rl in out.router_logits]


def test_logprobs_and_routes_match_a_direct_hf_forward(client, hf_model):
    samples = client.generate_sync(PROMPTS, n=2, seed=1, sampling_params={
        "temperature": TEMPERATURE, "top_k": 12, "top_p": 0.9, "min_p": 0.02,
        "max_new_tokens": 24})
    assert len(samples) == 8
    for s in samples:
        full_R, kept_R, router_logits = reference(hf_model, s, TEMPERATURE)
        assert torch.allclose(s.full_logprobs_R, full_R, atol=1e-5, rtol=0)
        assert torch.allclose(s.rollout_logprobs_R, kept_R, atol=1e-5, rtol=0)
        T = len(s.prompt_ids) + len(s.response_ids) - 1
        assert s.routes_TLK.shape == (T, 3, 2)
        assert not s.routes_TLK[:, 0].any()  # layer 0 is dense: zeros, as SGLang
        for i, layer in enumerate((1, 2)):
            top2 = torch.topk(router_logits[i][:T], 2, dim=-1).indices.sort(-1).values
            assert torch.equal(s.routes_TLK[:, layer].long().sort(-1).values, top2)


def test_greedy_rows_are_argmax_with_single_token_mask(client, hf_model):
    [s] = client.generate_sync([PROMPTS[2]], sampling_params={"temperature": 0.0,
                                                              "max_new_tokens": 10})
    with torch.no_grad():
        logits = hf_model(input_ids=torch.tensor([s.prompt_ids + s.response_ids])).logits[0]
    P = len(s.prompt_ids)
    assert s.response_ids == logits[P - 1:-1].argmax(-1).tolist()[:len(s.response_ids)]
    assert s.mask_offsets_R1.tolist() == list(range(len(s.response_ids) + 1))
    assert s.mask_ids_M.tolist() == s.response_ids
    assert s.rollout_logprobs_R.abs().max().item() == 0.0
    # Greedy is temperature 1 (SGLang's normalisation): full log-probs are log_softmax(logits).
    full = torch.log_softmax(logits[P - 1:-1].float(), -1)
    ref = full.gather(1, torch.tensor(s.response_ids)[:, None]).squeeze(1)
    assert torch.allclose(s.full_logprobs_R, ref, atol=1e-5)


def test_batched_equals_alone_and_seeds_reproduce(server):
    sp = {"temperature": 1.0, "top_p": 0.95, "max_new_tokens": 20}
    batch = RolloutClient(server.url, api_key=server.api_key, concurrency=8)
    together = batch.generate_sync(PROMPTS, n=3, seed=42, sampling_params=sp)
    again = batch.generate_sync(PROMPTS, n=3, seed=42, sampling_params=sp)
    alone = []
    serial = RolloutClient(server.url, api_key=server.api_key, concurrency=1)
    for g, prompt in enumerate(PROMPTS):
        alone += serial.generate_sync([prompt], n=3, seed=42, sampling_params=sp,
                                      group_index_offset=g)
    different = batch.generate_sync(PROMPTS, n=3, seed=43, sampling_params=sp)
    for a, b, c in zip(together, again, alone):
        assert a.response_ids == b.response_ids == c.response_ids
        assert torch.allclose(a.full_logprobs_R, c.full_logprobs_R, atol=1e-5)
        assert torch.allclose(a.rollout_logprobs_R, c.rollout_logprobs_R, atol=1e-5)
        assert torch.equal(a.routes_TLK, c.routes_TLK)
        assert torch.equal(a.mask_offsets_R1, c.mask_offsets_R1)
    assert [s.response_ids for s in together] != [s.response_ids for s in different]
    # Within a group the per-sample seeds differ, so the samples do too.
    assert len({tuple(s.response_ids) for s in together[:3]}) > 1


def test_top_p_alone_mask_and_both_wire_formats_agree(server):
    sp = {"temperature": 1.0, "top_p": 0.7, "max_new_tokens": 16}
    kw = dict(n=2, seed=5, sampling_params=sp)
    compact = RolloutClient(server.url, api_key=server.api_key, wire_format="compact")
    sglang = RolloutClient(server.url, api_key=server.api_key, wire_format="sglang")
    a, b = compact.generate_sync(PROMPTS, **kw), sglang.generate_sync(PROMPTS, **kw)
    for x, y in zip(a, b):
        assert x.response_ids == y.response_ids and torch.equal(x.routes_TLK, y.routes_TLK)
        assert torch.equal(x.mask_offsets_R1, y.mask_offsets_R1)
        for r in range(len(x.response_ids)):
            lo, hi = x.mask_offsets_R1[r], x.mask_offsets_R1[r + 1]
            assert sorted(x.mask_ids_M[lo:hi].tolist()) == sorted(y.mask_ids_M[lo:hi].tolist())
        # Top-p alone truncates: rows are proper subsets of the vocabulary.
        assert (x.mask_offsets_R1.diff() < 64).all() and (x.mask_offsets_R1.diff() > 0).all()


def test_untruncated_rows_become_empty_csr_rows(client):
    [s] = client.generate_sync([PROMPTS[0]], sampling_params={"temperature": 1.0,
                                                              "max_new_tokens": 5})
    # No top-k/top-p/min-p: every row is the whole vocabulary -> length 0 ("no truncation").
    assert s.mask_offsets_R1.tolist() == [0] * 6 and s.mask_ids_M.numel() == 0
    assert torch.allclose(s.rollout_logprobs_R, s.full_logprobs_R, atol=1e-6)


def test_model_info_reports_sglang_fields_and_moerl_layout(server):
    status, info = post(server, "/model_info", method="GET")
    assert status == 200
    for key in ("model_path", "served_model_name", "tokenizer_path", "is_generation",
                "preferred_sampling_params", "weight_version", "load_format", "model_type",
                "architectures"):
        assert key in info
    assert info["weight_version"] == "default" and info["model_type"] == "qwen3_moe"
    assert info["moerl"]["layout"] == {"num_hidden_layers": 3, "moe_layers": [1, 2],
                                       "num_experts": 8, "top_k": 2, "vocab_size": 64}
    assert info["moerl"]["context_length"] == 512 and info["moerl"]["eos_token_ids"] == [2]


GOOD = {"input_ids": [1, 2, 3], "sampling_params": {"max_new_tokens": 4}}


def _sp(**kw):
    return {"input_ids": [1, 2, 3], "sampling_params": {"max_new_tokens": 4, **kw}}


BAD_REQUESTS = [
    # (name, path, body or raw bytes, expected status, substring of the message)
    ("malformed JSON", "/generate", b'{"input_ids": [1, 2', 400, "malformed JSON"),
    ("NaN literal", "/generate", b'{"input_ids": [1], "sampling_params": {"top_p": NaN}}', 400,
     "NaN"),
    ("body not an object", "/generate", [1, 2, 3], 400, "invalid type: sequence"),
    ("text prompt", "/generate", {"text": "hello"}, 400, "not supported"),
    ("no input_ids", "/generate", {"sampling_params": {}}, 400, "input_ids is required"),
    ("input_ids a string", "/generate", {"input_ids": "1 2 3"}, 400, "invalid type: string"),
    ("empty input_ids", "/generate", {"input_ids": []}, 400, "cannot be empty"),
    ("empty inner prompt", "/generate", {"input_ids": [[1], []]}, 400, "input_ids[1] cannot"),
    ("float token", "/generate", {"input_ids": [1, 2.5]}, 400, "floating point `2.5`"),
    ("bool token", "/generate", {"input_ids": [1, True]}, 400, "boolean `true`"),
    ("id out of vocab", "/generate", {"input_ids": [1, 64]}, 400, "out-of-vocabulary token id 64"),
    ("negative id", "/generate", {"input_ids": [-1]}, 400, "out-of-vocabulary token id -1"),
    ("prompt too long", "/generate", {"input_ids": [1] * 512}, 400, "longer than the model's"),
    ("unknown sampling key", "/generate", _sp(temprature=1.0), 400,
     "unknown field `temprature`, expected one of `max_new_tokens`"),
    ("temperature a string", "/generate", _sp(temperature="hot"), 400,
     'invalid type: string "hot", expected f64'),
    ("negative temperature", "/generate", _sp(temperature=-1), 400, "non-negative finite"),
    ("top_p zero", "/generate", _sp(top_p=0), 400, "top_p must be in (0, 1]"),
    ("top_k zero", "/generate", _sp(top_k=0), 400, "top_k must be -1"),
    ("min_p above 1", "/generate", _sp(min_p=1.5), 400, "min_p must be in [0, 1]"),
    ("negative max_new_tokens", "/generate", _sp(max_new_tokens=-3), 400, "at least 0"),
    ("beyond context", "/generate", _sp(max_new_tokens=600), 400, "maximum context length"),
    ("n zero", "/generate", _sp(n=0), 400, "n must be in"),
    ("stop id out of vocab", "/generate", _sp(stop_token_ids=[99]), 400, "stop_token_ids"),
    ("seed not an int", "/generate", _sp(sampling_seed="7"), 400, "sampling_seed"),
    ("penalty unsupported", "/generate", _sp(frequency_penalty=0.5), 400, "not supported"),
    ("stop strings need a tokenizer", "/generate", _sp(stop=["\n"]), 400, "not supported"),
    ("params list length", "/generate", {"input_ids": [[1], [2]], "sampling_params": [{}]}, 400,
     "1 entries for 2 prompts"),
    ("n differs in list", "/generate", {"input_ids": [[1], [2]], "sampling_params": [
        {"n": 1}, {"n": 2}]}, 400, "parallel_sample_num"),
    ("duplicate rids", "/generate", {"input_ids": [[1], [2]], "rid": ["a", "a"]}, 400,
     "Duplicate request IDs"),
    ("routes start beyond prompt", "/generate", {**GOOD, "return_routed_experts": True,
                                                 "routed_experts_start_len": 9}, 400,
     "routed_experts_start_len=9"),
    ("mode without mask", "/generate", {**GOOD, "sampling_logprobs_mode": "support"}, 400,
     "only be set when return_sampling_mask=true"),
    ("bad logprobs mode", "/generate", {**GOOD, "return_sampling_mask": True,
                                        "sampling_logprobs_mode": "all"}, 400, "'selected'"),
    ("mask top_k above cap", "/generate", {**_sp(top_k=5000), "return_sampling_mask": True}, 400,
     "return_sampling_mask requires top_k=1"),
    ("streaming", "/generate", {**GOOD, "stream": True}, 400, "stream is not supported"),
    ("wrong type of flag", "/generate", {**GOOD, "return_logprob": "yes"}, 400, "a boolean"),
    ("huge payload", "/generate", {"input_ids": [1] * 400_000}, 413, "exceeds the server limit"),
    ("unknown endpoint", "/generate_all", GOOD, 404, "Not Found"),
    ("bad pause mode", "/pause_generation", {"mode": "sleep"}, 400, "'abort', 'retract'"),
    ("update outside session", "/update_weights_from_distributed", {
        "names": ["lm_head.weight"], "dtypes": ["float32"], "shapes": [[64, 64]]}, 400,
     "between begin_weight_update() and end_weight_update()"),
    ("missing disk path", "/update_weights_from_disk", {"model_path": "/nonexistent/x"}, 400,
     "is not a directory"),
    ("unknown control field", "/init_weights_update_group", {"master_address": "x", "port": 1},
     400, "unknown field `port`"),
    ("missing control field", "/init_weights_update_group", {"master_address": "127.0.0.1"}, 400,
     "missing field `master_port`"),
]


def _message(payload):
    if isinstance(payload, dict):
        err = payload.get("error")
        return err["message"] if isinstance(err, dict) else payload.get("message", str(payload))
    return str(payload)


@pytest.mark.parametrize("name, path, body, status, needle", BAD_REQUESTS,
                         ids=[b[0] for b in BAD_REQUESTS])
def test_bad_requests_get_a_clear_4xx_and_the_server_keeps_serving(server, name, path, body,
                                                                   status, needle):
    raw = body if isinstance(body, bytes) else None
    got, payload = post(server, path, None if raw else body, raw=raw)
    assert got == status, (name, payload)
    assert isinstance(payload, dict), payload  # JSON, never an HTML/text error page
    assert needle in _message(payload), _message(payload)
    assert post(server, "/health", method="GET")[0] == 200


def test_wrong_method_and_auth(server):
    assert post(server, "/generate", method="GET")[0] == 405
    status, payload = post(server, "/generate", GOOD, key=None)
    assert status == 401 and "Bearer" in payload["error"]["message"]
    assert post(server, "/generate", GOOD, key="wrong")[0] == 401
    assert post(server, "/pause_generation", {"mode": "retract"}, key="wrong")[0] == 401
    assert post(server, "/model_info", key=None, method="GET")[0] == 401
    assert post(server, "/health", key=None, method="GET")[0] == 200  # probes need no key
    status, out = post(server, "/generate", GOOD)
    assert status == 200 and len(out["output_ids"]) == 4  # still serving after all of it


@pytest.fixture(scope="module")
def keyless_server(model_dir):
    # A second configuration, served in this process (same HTTP and engine code) on loopback.
    from moerl.rollout.server import BackgroundServer

    handle = BackgroundServer(model_dir, api_key=None, sampling_mask_max_tokens=8)
    yield handle
    handle.stop()


def test_server_without_key_refuses_mutations_and_enforces_mask_cap(keyless_server):
    s = keyless_server
    assert post(s, "/generate", GOOD, key=None)[0] == 200
    for path in ("/pause_generation", "/flush_cache", "/update_weights_from_disk",
                 "/begin_weight_update"):
        status, payload = post(s, path, {}, key=None)
        assert status == 403 and "requires an API key" in payload["error"]["message"]
    # top_k above --sampling-mask-max-tokens is refused up front, as in SGLang ...
    status, payload = post(s, "/generate", {**_sp(top_k=9), "return_sampling_mask": True},
                           key=None)
    assert status == 400 and "<= 8" in payload["error"]["message"]
    # ... and a realised support above it aborts the request with SGLang's 400 message.
    status, payload = post(s, "/generate", {**_sp(top_p=1.0), "return_sampling_mask": True},
                           key=None)
    assert status == 400 and "--sampling-mask-max-tokens=8" in payload["error"]["message"]
    assert post(s, "/generate", {**_sp(top_k=8), "return_sampling_mask": True}, key=None)[0] == 200


def test_pause_retract_then_continue_records_both_weight_versions(server, model_dir):
    body = {"input_ids": [1, 4, 4], "sampling_params": {"max_new_tokens": 400, "ignore_eos": True,
                                                        "temperature": 1.0, "top_k": 10},
            "return_logprob": True, "return_routed_experts": True, "return_sampling_mask": True}
    result = {}
    worker = threading.Thread(target=lambda: result.update(out=post(server, "/generate", body)))
    worker.start()
    deadline = time.monotonic() + 30
    while post(server, "/model_info", method="GET")[1]["moerl"]["running"] == 0:
        assert time.monotonic() < deadline
        time.sleep(0.005)
    assert post(server, "/pause_generation", {"mode": "retract"})[0] == 200
    info = post(server, "/model_info", method="GET")[1]["moerl"]
    assert info["paused"] and (info["running"], info["waiting"]) == (0, 1)
    assert post(server, "/update_weight_version", {"new_version": "mid",
                                                   "abort_all_requests": False})[0] == 200
    assert post(server, "/continue_generation", {})[0] == 200
    worker.join(60)
    status, out = result["out"]
    assert status == 200
    meta = out["meta_info"]
    assert meta["num_retractions"] == 1 and len(out["output_ids"]) == 400
    spans = meta["weight_versions"]
    assert [s["version"] for s in spans] == ["default", "mid"] and meta["weight_version"] == "mid"
    assert spans[0]["start"] == 0 and spans[0]["end"] == spans[1]["start"] > 0
    assert spans[1]["end"] == 400
    from moerl.rollout.protocol import MoeLayout, decode_generate_output

    decoded = decode_generate_output(out, prompt_len=3, layout=MoeLayout.from_hf_config(model_dir),
                                     want_routes=True, want_mask=True)
    assert decoded.routes_TLK.shape == (402, 3, 2)
    assert post(server, "/update_weight_version", {"new_version": "default",
                                                   "abort_all_requests": False})[0] == 200


def test_pause_abort_mid_batch_is_retried_by_the_client(server):
    client = RolloutClient(server.url, api_key=server.api_key, concurrency=4,
                           retry=RetryPolicy(max_attempts=20, initial_backoff_s=0.05,
                                             max_backoff_s=0.2))
    result = {}
    sp = {"temperature": 1.0, "max_new_tokens": 300, "ignore_eos": True, "top_k": 20}
    worker = threading.Thread(target=lambda: result.update(
        samples=client.generate_sync(PROMPTS, n=2, seed=9, sampling_params=sp)))
    worker.start()
    deadline = time.monotonic() + 60
    while post(server, "/model_info", method="GET")[1]["moerl"]["running"] == 0:
        assert time.monotonic() < deadline
        time.sleep(0.005)
    assert post(server, "/pause_generation", {"mode": "abort"})[0] == 200
    time.sleep(0.3)  # aborted groups come back and are resubmitted; paused, they wait
    assert post(server, "/continue_generation", {})[0] == 200
    worker.join(120)
    samples = result["samples"]
    assert [(s.group_index, s.sample_index) for s in samples] == [
        (g, j) for g in range(4) for j in range(2)]
    assert all(len(s.response_ids) == 300 and s.finish_reason == "length" for s in samples)
    assert run_sync(client.flush_cache())


@pytest.mark.sglang
def test_live_responses_pass_sglangs_response_contract(server):
    pytest.importorskip("sglang")
    api = pytest.importorskip("sglang.api.v1.api_types")
    for body in ({"input_ids": [1, 2, 3], "sampling_params": {"max_new_tokens": 5, "top_k": 5},
                  "return_logprob": True, "return_routed_experts": True,
                  "return_sampling_mask": True},
                 {"input_ids": [[1, 2], [3, 4, 5]], "sampling_params": {
                     "max_new_tokens": 4, "n": 2, "temperature": 0.0}, "return_logprob": True,
                  "return_sampling_mask": True, "sampling_logprobs_mode": "support"}):
        api.GenerateRequest.from_json_value(body)
        status, out = post(server, "/generate", body)
        assert status == 200
        for o in out if isinstance(out, list) else [out]:
            decoded = api.GenerateResponse.from_json_value(o)
            assert decoded.meta_info.weight_version == o["meta_info"]["weight_version"]
            assert decoded.meta_info.finish_reason is not None


def test_answers_what_a_load_balancer_asks_and_samples_alone_equal_a_batch(server):
    """SMG registers a worker only after /server_info (or /get_server_info) and /v1/models
    (moerl.rollout.router); behind it the client sends each sample as its own request."""
    for path in ("/server_info", "/get_server_info"):
        status, info = post(server, path, method="GET")
        assert status == 200 and info["dp_size"] == 1 and info["max_running_requests"] == 16
    status, models = post(server, "/v1/models", method="GET")
    assert status == 200 and models["data"][0]["owned_by"] == "sglang"
    kw = dict(n=3, seed=8, sampling_params={"temperature": 1.0, "top_k": 8, "max_new_tokens": 6})
    batch = RolloutClient(server.url, api_key=server.api_key).generate_sync(PROMPTS[:2], **kw)
    alone = RolloutClient(server.url, api_key=server.api_key,
                          request_per_sample=True).generate_sync(PROMPTS[:2], **kw)
    assert [(s.group_index, s.sample_index) for s in alone] == [
        (g, j) for g in range(2) for j in range(3)]
    for a, b in zip(batch, alone):
        assert a.response_ids == b.response_ids and torch.equal(a.routes_TLK, b.routes_TLK)
        assert torch.equal(a.mask_offsets_R1, b.mask_offsets_R1)
