"""The built-in server against a hostile or careless client (issue 11, items 7-9): a client that
disconnects frees the engine, one client's huge request cannot hold every other client back,
and what one request may cost is bounded with a clear 4xx. The server runs in this process
(BackgroundServer: the same HTTP and engine code as the CLI) on loopback."""

from __future__ import annotations

import json
import socket
import threading
import time
import urllib.error
import urllib.request

import pytest

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def server(model_dir):
    from moerl.rollout.server import BackgroundServer

    handle = BackgroundServer(model_dir, api_key=None, max_batch_size=2,
                              max_request_tokens=4000, max_response_mb=0.1)
    yield handle
    handle.stop()


def post(server, path, body=None, *, raw=None, headers=None, method="POST"):
    data = raw if raw is not None else (None if body is None else json.dumps(body).encode())
    req = urllib.request.Request(server.url + path, data=data, method=method,
                                 headers={"Content-Type": "application/json", **(headers or {})})
    try:
        with urllib.request.urlopen(req, timeout=300) as r:
            status, payload = r.status, r.read()
    except urllib.error.HTTPError as e:
        status, payload = e.code, e.read()
    try:
        return status, json.loads(payload)
    except ValueError:
        return status, payload.decode()


def engine_state(server) -> dict:
    return post(server, "/model_info", method="GET")[1]["moerl"]


def _wait(predicate, what, timeout=300):
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.01)


def _long(n, max_new_tokens):
    return {"input_ids": [1, 4, 4], "sampling_params": {
        "n": n, "max_new_tokens": max_new_tokens, "ignore_eos": True, "temperature": 1.0}}


def test_a_client_that_disconnects_frees_the_engine(server):
    start = engine_state(server)["decode_steps"]
    body = json.dumps(_long(2, 400)).encode()
    host, port = server.url.removeprefix("http://").split(":")
    sock = socket.create_connection((host, int(port)))
    sock.sendall(b"POST /generate HTTP/1.1\r\nHost: %s\r\nContent-Type: application/json\r\n"
                 b"Content-Length: %d\r\n\r\n%s" % (server.url[7:].encode(), len(body), body))
    _wait(lambda: engine_state(server)["running"] == 2, "the request to start")
    sock.close()
    _wait(lambda: engine_state(server)["running"] + engine_state(server)["waiting"] == 0,
          "the engine to drop the abandoned sequences")
    # Stopped early: 400 tokens per sequence would have taken 400 decode steps.
    assert engine_state(server)["decode_steps"] - start < 399
    assert post(server, "/generate", _long(1, 3))[0] == 200  # and it still serves


def test_a_huge_request_does_not_hold_back_a_small_one(server):
    # The engine decodes 2 sequences at a time. First in, first out, the small request would
    # wait for 15 of the big one's 16 sequences: >= 7 x 100 decode steps.
    start = engine_state(server)["decode_steps"]
    big = threading.Thread(target=post, args=(server, "/generate", _long(16, 100)))
    big.start()
    _wait(lambda: engine_state(server)["running"] == 2, "the big request to start")
    status, out = post(server, "/generate", _long(1, 5))
    steps = engine_state(server)["decode_steps"] - start
    assert status == 200 and len(out["output_ids"]) == 5
    assert steps < 400, f"the small request finished only after {steps} decode steps"
    big.join(600)


@pytest.mark.parametrize("body, status, message", [
    ({**_long(10, 400)}, 413, "asks for 4030 tokens"),
    ({**_long(10, 50), "return_sampling_mask": True}, 413, "--max-response-mb"),
])
def test_what_one_request_may_cost_is_bounded(server, body, status, message):
    got, payload = post(server, "/generate", body)
    assert got == status and message in payload["error"]["message"], payload
    assert post(server, "/generate", _long(1, 3))[0] == 200


def test_default_limits_refuse_the_probes_request(model_dir):
    from moerl.rollout import schema

    limits = schema.Limits(vocab_size=64, context_length=512, sampling_mask_max_tokens=4096,
                           route_entries_per_token=4)
    body = {"input_ids": [1, 2, 3, 4], "sampling_params": {"n": 4096, "max_new_tokens": 500},
            "return_logprob": True, "return_routed_experts": True}
    with pytest.raises(schema.RequestError, match="--max-request-tokens") as err:
        schema.parse_generate_request(body, limits=limits)
    assert err.value.status == 413


# ------------------------------------------------------------------ browsers and odd inputs
# (items 8 and 9)

GOOD = {"input_ids": [1, 5, 9], "sampling_params": {"max_new_tokens": 2}}


def test_a_browser_cannot_drive_a_keyless_server(server):
    port = server.url.rsplit(":", 1)[1]
    # A cross-site form or fetch without pre-flight sends text/plain.
    status, payload = post(server, "/generate", GOOD, headers={"Content-Type": "text/plain"})
    assert status == 415 and "application/json" in payload["error"]["message"]
    # DNS rebinding: the browser sends the attacker's name as Host.
    status, payload = post(server, "/generate", GOOD, headers={"Host": f"evil.example:{port}"})
    assert status == 403 and "--allowed-hosts" in payload["error"]["message"]
    for host in (f"localhost:{port}", f"127.0.0.1:{port}"):
        assert post(server, "/generate", GOOD, headers={"Host": host})[0] == 200
    assert post(server, "/health", method="GET", headers={"Host": "evil.example"})[0] == 200


@pytest.mark.parametrize("patch, message", [
    ({"routed_experts_start_len": ""}, "routed_experts_start_len"),
    ({"return_routed_experts": 0}, "return_routed_experts"),
    ({"moerl_compact": ""}, "moerl_compact"),
])
def test_falsy_garbage_is_refused(server, patch, message):
    status, payload = post(server, "/generate", {**GOOD, **patch})
    assert status == 400 and message in payload["error"]["message"], payload


def test_deeply_nested_json_is_a_400(server):
    status, payload = post(server, "/generate", raw=b"[" * 100_000 + b"]" * 100_000)
    assert status == 400 and "nested too deeply" in payload["error"]["message"]


def test_a_non_ascii_bearer_token_is_a_401(model_dir):
    from moerl.rollout.server import BackgroundServer

    keyed = BackgroundServer(model_dir, api_key="k")
    try:
        for token in ("Bearer \u00e9t\u00e9", "Bearer k\u00e9"):
            status, _ = post(keyed, "/generate", GOOD,
                             headers={"Authorization": token.encode().decode("latin-1")})
            assert status == 401
        assert post(keyed, "/generate", GOOD, headers={"Authorization": "Bearer k"})[0] == 200
        # With a key the Host check is off: a browser cannot send the key cross-site.
        assert post(keyed, "/generate", GOOD, headers={"Authorization": "Bearer k",
                                                       "Host": "gpu-17.cluster"})[0] == 200
    finally:
        keyed.stop()


def test_server_flags_refuse_a_zero_body_limit():
    from moerl.rollout.server import build_arg_parser

    with pytest.raises(SystemExit):
        build_arg_parser().parse_args(["--model", "m", "--max-request-mb", "0"])


@pytest.fixture(scope="module")
def keyed(model_dir):
    from moerl.rollout.server import BackgroundServer

    handle = BackgroundServer(model_dir, api_key="k", idle_timeout_s=1.0, body_timeout_s=1.0)
    yield handle
    handle.stop()


def _admin(server, path, body):
    return post(server, path, body, headers={"Authorization": "Bearer k"})


def _checkpoint_with(model_dir, out, change):
    """A copy of the model's checkpoint with ``change(tensors)`` applied to its tensors."""
    import shutil

    from safetensors.torch import load_file, save_file

    shutil.copytree(model_dir, out)
    for file in out.glob("*.safetensors"):
        tensors = load_file(file)
        change(tensors)
        save_file(tensors, file, metadata={"format": "pt"})
    return out


def _set_first(value):
    import torch

    def change(tensors):
        name = sorted(tensors)[0]
        t = tensors[name]
        tensors[name] = torch.full_like(t, value) if value is not int else t.to(torch.int32)
    return change


def test_weight_loads_refuse_what_would_break_the_engine(keyed, model_dir, tmp_path):
    import os

    nan = _checkpoint_with(model_dir, tmp_path / "nan", _set_first(float("nan")))
    ints = _checkpoint_with(model_dir, tmp_path / "ints", _set_first(int))
    garbage = tmp_path / "garbage"
    garbage.mkdir()
    (garbage / "model.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json")
    outside = tmp_path / "outside"
    outside.mkdir()
    os.symlink(next(model_dir.glob("*.safetensors")), outside / "model.safetensors")
    fifo = tmp_path / "fifo"
    fifo.mkdir()
    os.mkfifo(fifo / "model.safetensors")
    cases = [(nan, "non-finite value"), (ints, "must be floating point"),
             (garbage, "not a valid safetensors file"), (outside, "outside the checkpoint"),
             (fifo, "not a regular file"), (tmp_path / ("x" * 5000), "model_path is unusable")]
    for path, message in cases:
        status, payload = _admin(keyed, "/update_weights_from_disk", {"model_path": str(path)})
        assert status == 400 and message in payload["message"], (path.name, payload)
    assert _admin(keyed, "/generate", GOOD)[0] == 200
    assert post(keyed, "/health", method="GET")[0] == 200


def test_health_says_when_the_engine_cannot_serve(keyed):
    import torch

    param = next(keyed.engine.model.parameters())
    saved = param.detach().clone()
    with torch.no_grad():
        param.fill_(float("nan"))  # what unchecked weights did
    try:
        assert _admin(keyed, "/generate", GOOD)[0] == 500
        assert post(keyed, "/health", method="GET")[0] == 503
    finally:
        with torch.no_grad():
            param.copy_(saved)
    assert _admin(keyed, "/generate", GOOD)[0] == 200
    assert post(keyed, "/health", method="GET")[0] == 200


def _raw(server, payload: bytes) -> bytes:
    """Send ``payload`` and read until the server closes the connection (60 s at most)."""
    host, port = server.url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=60) as sock:
        if payload:
            sock.sendall(payload)
        chunks = []
        while chunk := sock.recv(65536):
            chunks.append(chunk)
    return b"".join(chunks)


def test_idle_and_slow_connections_are_timed_out(keyed):
    assert _raw(keyed, b"") == b""  # an idle connection is closed, not kept for an hour
    slow = (b"POST /generate HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer k\r\n"
            b"Content-Type: application/json\r\nContent-Length: 100\r\n\r\n{\"input_ids\"")
    reply = _raw(keyed, slow)
    assert reply.startswith(b"HTTP/1.1 408") and b"--body-timeout-s" in reply


def test_host_allow_list():
    import socket

    from moerl.rollout.http_guard import allowed_hosts, host_allowed

    loopback = allowed_hosts("127.0.0.1", api_key=None)
    assert host_allowed("localhost:30000", loopback) and host_allowed("[::1]:30000", loopback)
    assert not host_allowed("attacker.example:30000", loopback) and not host_allowed("", loopback)
    every = allowed_hosts("0.0.0.0", api_key=None, extra="rollout-0.cluster")
    assert host_allowed(f"{socket.gethostname()}:30000", every)
    assert host_allowed("rollout-0.cluster:30000", every)
    assert allowed_hosts("0.0.0.0", api_key=None, extra="*") is None
    assert allowed_hosts("127.0.0.1", api_key="k") is None
