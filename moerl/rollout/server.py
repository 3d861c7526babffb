"""moerl's built-in rollout server: SGLang 0.5.23's native HTTP API over :class:`Engine`.

``python -m moerl.rollout.server --model DIR --port N [--dtype float32|bfloat16|float16]
[--api-key K]``

Endpoints (SGLang's names and request schemas, see ``moerl.rollout.schema``): ``/generate``,
``/health`` (and ``/health_generate``), ``/model_info`` (and ``/get_model_info``),
``/flush_cache``, ``/pause_generation`` (``abort`` | ``retract`` | ``in_place``),
``/continue_generation``, ``/update_weights_from_disk`` (a Hugging Face safetensors directory),
``/update_weight_version``, and the distributed weight push ``/init_weights_update_group`` ->
``/begin_weight_update`` -> ``/update_weights_from_distributed`` -> ``/end_weight_update``
(``/destroy_weights_update_group``): tensors arrive by ``torch.distributed`` broadcast from trainer
rank 0 over a separate process group (gloo on CPU, NCCL on GPU), never in the HTTP body, and
nothing received is ever unpickled.

Security: binds 127.0.0.1 unless ``--host`` says otherwise; ``--api-key`` (or the environment
variable ``MOERL_ROLLOUT_API_KEY``) enables ``Authorization: Bearer <key>`` on every endpoint but
the health checks, as SGLang's ``--api-key``. Endpoints that change the server (weights, pause,
flush) always need the key: a server started without one refuses them with 403, like SGLang's
``ADMIN_FORCE`` endpoints without an admin key. Request bodies are capped (``--max-request-mb``).
Every client error is a 4xx JSON ``{"error": {"message": ..., "type": ..., "code": ...}}`` (the
``message`` field is SGLang's ``{"error": {"message"}}``); the weight endpoints answer SGLang's
``{"success": false, "message": ...}`` with 400. The server keeps serving after any bad request.

``/model_info`` returns SGLang's fields (``model_path``, ``served_model_name``, ``tokenizer_path``,
``is_generation``, ``preferred_sampling_params``, ``weight_version``, ``load_format``,
``reasoning_parser``, ``tool_call_parser``, ``disaggregation_mode``, ``has_image_understanding``,
``has_audio_understanding``, ``model_type``, ``architectures``) plus ``moerl``: ``{"server":
"moerl-builtin", "version", "sglang_api", "layout": MoeLayout.to_json(), "context_length",
"eos_token_ids", "dtype", "max_batch_size", "sampling_mask_max_tokens", "compact_encodings",
"paused", "running", "waiting", "num_finished", "decode_steps"}``.

:func:`moerl.rollout.launcher.launch_server` starts it as a subprocess (free port picked by the
OS), waits until ``/health`` answers and returns a ``ServerHandle``.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import concurrent.futures
import json
import logging
import os
import signal
import sys
import time
from pathlib import Path
from typing import Any, Awaitable, Callable

from aiohttp import web

import moerl
from moerl.rollout import http_guard, schema
from moerl.rollout.engine import Engine, GenerationRequest
# The launcher lives on the trainer's side (moerl.rollout.launcher); its names stay here too.
from moerl.rollout.launcher import API_KEY_ENV, ServerHandle, launch_server  # noqa: F401
from moerl.rollout.protocol import (
    COMPACT_MASK_ENCODING,
    COMPACT_ROUTES_ENCODINGS,
    SGLANG_VERSION,
)
from moerl.rollout.schema import RequestError

logger = logging.getLogger("moerl.rollout.server")

_OPEN, _NORMAL, _ADMIN = "open", "normal", "admin"



def _connection_settings(idle_timeout_s: float) -> dict:
    """A client that disconnects cancels its handler, whose /generate then aborts its sequences
    (aiohttp's default since 3.9 lets the handler run on); a connection that sends nothing for
    ``idle_timeout_s`` (before its first request or between requests) is closed (aiohttp's
    default is an hour)."""
    return {"handler_cancellation": True, "keepalive_timeout": idle_timeout_s}


def _json(data: Any, status: int = 200) -> web.Response:
    return web.Response(body=json.dumps(data).encode(), status=status,
                        content_type="application/json")


def error_response(status: int, message: str) -> web.Response:
    kind = {400: "BadRequestError", 401: "Unauthorized", 403: "Forbidden", 404: "NotFound",
            405: "MethodNotAllowed", 408: "RequestTimeout", 413: "PayloadTooLarge",
            415: "UnsupportedMediaType", 503: "ServiceUnavailable"}.get(
        status, "InternalServerError" if status >= 500 else "BadRequestError")
    return _json({"error": {"message": message, "type": kind, "code": status}}, status)


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not valid JSON")


class RolloutServer:
    """The aiohttp application: request validation, auth, and the bridge to the engine thread."""

    def __init__(self, engine: Engine, *, api_key: str | None, max_request_bytes: int,
                 weight_sync_timeout_s: float, return_routed_experts: bool = True,
                 max_request_tokens: int = schema.Limits.max_tokens_per_request,
                 max_response_bytes: int = schema.Limits.max_response_bytes,
                 allowed_hosts: frozenset | None = None, body_timeout_s: float = 60.0):
        self.engine = engine
        self.body_timeout_s = body_timeout_s
        self.allowed_hosts = allowed_hosts  # None: any Host header (see http_guard)
        # Off: like SGLang without --enable-return-routed-experts, requests may ask for routes
        # but responses carry none.
        self.return_routed_experts = return_routed_experts
        self.api_key = api_key or None
        self.model_path = engine.model_dir
        self.max_request_bytes = max_request_bytes
        self.weight_sync_timeout_s = weight_sync_timeout_s
        self.limits = schema.Limits(
            vocab_size=engine.layout.vocab_size, context_length=engine.context_length,
            sampling_mask_max_tokens=engine.sampling_mask_max_tokens,
            max_tokens_per_request=max_request_tokens, max_response_bytes=max_response_bytes,
            route_entries_per_token=len(engine.layout.moe_layers) * engine.layout.top_k)
        self._started = time.time()
        self._num_calls = 0  # /generate calls so far: each call is one client of the engine
        self._groups: dict[str, Any] = {}
        self._session_open = False
        # Weight transfers block on collectives: one at a time, off the event loop.
        self._sync_pool = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="wsync")
        self._io_pool = concurrent.futures.ThreadPoolExecutor(2, thread_name_prefix="wio")
        from moerl.rollout.weights import CheckpointWriter

        self.writer = CheckpointWriter(engine.model)

    def app(self) -> web.Application:
        app = web.Application(client_max_size=self.max_request_bytes,
                              middlewares=[self._middleware])
        routes = [
            ("GET", "/health", self.health, _OPEN), ("GET", "/health_generate", self.health, _OPEN),
            ("GET", "/model_info", self.model_info, _NORMAL),
            ("GET", "/get_model_info", self.model_info, _NORMAL),
            ("GET", "/server_info", self.server_info, _NORMAL),
            ("GET", "/get_server_info", self.server_info, _NORMAL),
            ("GET", "/v1/models", self.models, _NORMAL),
            ("POST", "/generate", self.generate, _NORMAL),
            ("PUT", "/generate", self.generate, _NORMAL),
            ("GET", "/flush_cache", self.flush_cache, _ADMIN),
            ("POST", "/flush_cache", self.flush_cache, _ADMIN),
            ("POST", "/pause_generation", self.pause_generation, _ADMIN),
            ("POST", "/continue_generation", self.continue_generation, _ADMIN),
            ("POST", "/update_weights_from_disk", self.update_weights_from_disk, _ADMIN),
            ("POST", "/update_weight_version", self.update_weight_version, _ADMIN),
            ("POST", "/init_weights_update_group", self.init_weights_update_group, _ADMIN),
            ("POST", "/destroy_weights_update_group", self.destroy_weights_update_group, _ADMIN),
            ("POST", "/begin_weight_update", self.begin_weight_update, _ADMIN),
            ("POST", "/end_weight_update", self.end_weight_update, _ADMIN),
            ("POST", "/update_weights_from_distributed", self.update_weights_from_distributed,
             _ADMIN),
        ]
        self._levels = {path: level for _, path, _, level in routes}
        for method, path, handler, _ in routes:
            app.router.add_route(method, path, handler)
        return app

    # ------------------------------------------------------------------ middleware

    def _authorized(self, request: web.Request) -> web.Response | None:
        level = self._levels.get(request.path, _NORMAL)
        if level == _OPEN:
            return None
        if level == _ADMIN and self.api_key is None:
            return error_response(403, f"{request.path} changes the server and requires an API "
                                       f"key, but this server was started without --api-key")
        if not http_guard.host_allowed(request.headers.get("Host"), self.allowed_hosts):
            return error_response(403, f"Host header {request.headers.get('Host')!r} is not "
                                       f"this server's address: start it with --api-key, or "
                                       f"name the host with --allowed-hosts")
        if request.can_read_body and not http_guard.is_json(request.headers.get(
                "Content-Type", "")):
            return error_response(415, f"request bodies must be JSON (Content-Type: "
                                       f"application/json), got {request.content_type!r}")
        if self.api_key is None:
            return None
        if not http_guard.token_matches(request.headers.get("Authorization", ""), self.api_key):
            return error_response(401, "Unauthorized: missing or wrong 'Authorization: Bearer "
                                       "<api key>' header")
        return None

    @web.middleware
    async def _middleware(self, request: web.Request, handler: Callable[..., Awaitable]):
        denied = self._authorized(request)
        if denied is not None:
            return denied
        try:
            return await handler(request)
        except RequestError as e:
            return error_response(e.status, str(e))
        except web.HTTPRequestEntityTooLarge:
            return error_response(413, f"request body exceeds the server limit of "
                                       f"{self.max_request_bytes} bytes (--max-request-mb)")
        except web.HTTPException as e:
            return error_response(e.status, f"{e.reason}: {request.method} {request.path}")
        except (asyncio.CancelledError, ConnectionResetError):
            raise
        except Exception:
            logger.exception("unhandled error in %s", request.path)
            return error_response(500, "Internal server error")

    async def _body(self, request: web.Request) -> Any:
        try:
            raw = await asyncio.wait_for(request.read(), self.body_timeout_s)
        except asyncio.TimeoutError:
            raise RequestError(f"the request body did not arrive within {self.body_timeout_s:g} "
                               f"s (--body-timeout-s)", status=408) from None
        if not raw:
            return None
        try:
            return json.loads(raw, parse_constant=_reject_constant)
        except (UnicodeDecodeError, ValueError) as e:
            raise RequestError(f"malformed JSON body: {e}") from e
        except RecursionError:
            raise RequestError("malformed JSON body: nested too deeply") from None

    # ------------------------------------------------------------------ info

    async def health(self, request: web.Request) -> web.Response:
        """200 only when the engine thread runs and its last step did not fail."""
        healthy = self.engine.alive and self.engine.last_error is None
        return web.Response(status=200 if healthy else 503)

    async def model_info(self, request: web.Request) -> web.Response:
        e = self.engine
        running, waiting = await self._engine_call(e.num_requests)
        return _json({
            "model_path": self.model_path, "served_model_name": self.model_path,
            "tokenizer_path": None, "is_generation": True, "preferred_sampling_params": None,
            "weight_version": e.weight_version, "load_format": "auto", "reasoning_parser": None,
            "tool_call_parser": None, "disaggregation_mode": "null",
            "has_image_understanding": False, "has_audio_understanding": False,
            "model_type": getattr(e.config, "model_type", None),
            "architectures": getattr(e.config, "architectures", None),
            "moerl": {
                "server": "moerl-builtin", "version": moerl.__version__,
                "sglang_api": SGLANG_VERSION, "layout": e.layout.to_json(),
                "context_length": e.context_length, "eos_token_ids": sorted(e.eos_token_ids),
                "dtype": e.dtype, "max_batch_size": e.max_batch_size,
                "sampling_mask_max_tokens": e.sampling_mask_max_tokens,
                "compact_encodings": {"routes": list(COMPACT_ROUTES_ENCODINGS),
                                      "mask": [COMPACT_MASK_ENCODING]},
                "paused": e.paused, "running": running, "waiting": waiting,
                "num_finished": e.num_finished, "decode_steps": e.steps,
            },
        })

    async def server_info(self, request: web.Request) -> web.Response:
        """SGLang's ``/server_info``: the launch settings a load balancer reads when it registers
        a worker (SGLang's router and SMG ask for it and refuse a worker without it)."""
        e = self.engine
        return _json({
            "model_path": self.model_path, "served_model_name": self.model_path,
            "tp_size": 1, "dp_size": 1, "pp_size": 1, "disaggregation_mode": "null",
            "is_embedding": False, "context_length": e.context_length,
            "max_running_requests": e.max_batch_size, "weight_version": e.weight_version,
            "version": SGLANG_VERSION, "dtype": e.dtype,
            "sampling_mask_max_tokens": e.sampling_mask_max_tokens,
            # Built-in sampling is a pure function of (weights, prompt, sampling_seed).
            "enable_deterministic_inference": True,
            "enable_return_routed_experts": self.return_routed_experts,
        })

    async def models(self, request: web.Request) -> web.Response:
        """The OpenAI-style model list SGLang serves; ``owned_by`` tells a load balancer which
        engine's API this worker speaks."""
        return _json({"object": "list", "data": [{
            "id": self.model_path, "object": "model", "created": int(self._started),
            "owned_by": "sglang", "root": self.model_path,
            "max_model_len": self.engine.context_length}]})

    # ------------------------------------------------------------------ generate

    async def generate(self, request: web.Request) -> web.Response:
        if not self.engine.alive:
            return error_response(503, "the engine thread is not running")
        items, single = schema.parse_generate_request(await self._body(request),
                                                      limits=self.limits)
        loop = asyncio.get_running_loop()
        futures = [loop.create_future() for _ in items]

        def resolver(fut: asyncio.Future) -> Callable[[dict], None]:
            def done(out: dict) -> None:
                loop.call_soon_threadsafe(lambda: fut.done() or fut.set_result(out))
            return done

        if not self.return_routed_experts:
            items = [dataclasses.replace(it, return_routes=False) for it in items]
        self._num_calls += 1
        reqs = [GenerationRequest(item=it, done=resolver(f), client=self._num_calls)
                for it, f in zip(items, futures)]
        self.engine.submit(reqs)
        try:
            outs = await asyncio.gather(*futures)
        except asyncio.CancelledError:  # client went away: free the engine's capacity
            self.engine.cancel(reqs, "client disconnected")
            raise
        for out in outs:
            reason = out["meta_info"]["finish_reason"]
            code = reason.get("status_code") if reason.get("type") == "abort" else None
            if code is not None and code >= 400:  # SGLang raises these instead of returning them
                return error_response(code, reason["message"])
        return _json(outs[0] if single else outs)

    # ------------------------------------------------------------------ control

    async def _engine_call(self, fn: Callable[[], Any]) -> Any:
        if not self.engine.alive:
            raise RequestError("the engine thread is not running", status=503)
        return await asyncio.wrap_future(self.engine.call(fn))

    async def flush_cache(self, request: web.Request) -> web.Response:
        def flush() -> bool:
            if self.engine.num_requests()[0]:
                return False
            self.engine.flush_prompt_cache()
            return True
        if await self._engine_call(flush):
            return web.Response(text="Cache flushed.\nPlease check backend logs for more details. "
                                     "(When there are running or waiting requests, the operation "
                                     "will not be performed.)\n")
        return web.Response(status=400, text="Flush cache failed: requests are running; pause "
                                             "(retract) or wait for them first.\n")

    async def pause_generation(self, request: web.Request) -> web.Response:
        req = schema.parse_control(await self._body(request), schema.PAUSE_SCHEMA,
                                   endpoint="pause_generation")
        if req["mode"] not in ("abort", "retract", "in_place"):
            raise RequestError(f"pause_generation.mode must be 'abort', 'retract' or 'in_place', "
                               f"got {req['mode']!r}")
        await self._engine_call(lambda: self.engine.pause(req["mode"]))
        return _json({"message": "Generation paused successfully.", "status": "ok"})

    async def continue_generation(self, request: web.Request) -> web.Response:
        schema.parse_control(await self._body(request), schema.CONTINUE_SCHEMA,
                             endpoint="continue_generation")
        await self._engine_call(self.engine.resume)
        return _json({"message": "Generation continued successfully.", "status": "ok"})

    async def update_weight_version(self, request: web.Request) -> web.Response:
        req = schema.parse_control(await self._body(request), schema.UPDATE_VERSION_SCHEMA,
                                   endpoint="update_weight_version")
        if req["abort_all_requests"]:
            await self._engine_call(lambda: self.engine.abort_all(
                "Aborted by update_weight_version"))
        await self._engine_call(lambda: self.engine.set_weight_version(req["new_version"]))
        return _json({"success": True, "message": f"Weight version updated to "
                      f"{req['new_version']}", "new_version": req["new_version"]})

    async def _apply_weights(self, tensors: list, version: str | None, abort_all: bool) -> int:
        def apply() -> int:
            if abort_all:
                self.engine.abort_all("Aborted by a weight update")
            count = self.writer.write(tensors)
            self.engine.set_weight_version(version)
            return count
        return await self._engine_call(apply)

    async def update_weights_from_disk(self, request: web.Request) -> web.Response:
        req = schema.parse_control(await self._body(request), schema.UPDATE_FROM_DISK_SCHEMA,
                                   endpoint="update_weights_from_disk")
        path = Path(req["model_path"])
        try:
            is_dir = path.is_dir()
        except OSError as e:  # e.g. a name too long for the file system
            return _json({"success": False, "message": f"model_path is unusable: {e}",
                          "num_paused_requests": 0}, 400)
        if not is_dir:
            return _json({"success": False, "message": f"model_path {str(path)!r} is not a "
                          f"directory", "num_paused_requests": 0}, 400)

        def load() -> list:
            from moerl.rollout.weights import iter_safetensors_dir

            tensors = list(iter_safetensors_dir(path))
            for name, t in tensors:  # validate everything before writing anything
                self.writer.check(name, t.shape)
                self.writer.check_values(name, t)
            return tensors
        try:
            tensors = await asyncio.get_running_loop().run_in_executor(self._io_pool, load)
        except (ValueError, OSError) as e:
            return _json({"success": False, "message": f"Failed to update weights: {e}",
                          "num_paused_requests": 0}, 400)
        count = await self._apply_weights(tensors, req["weight_version"], req["abort_all_requests"])
        self.model_path = str(path)
        message = f"Succeeded to update model weights ({count} tensors)."
        if req["weight_version"] is not None:
            message += f" Weight version updated to {req['weight_version']}."
        return _json({"success": True, "message": message, "num_paused_requests": 0})

    async def init_weights_update_group(self, request: web.Request) -> web.Response:
        from moerl.rollout.weight_sync import init_custom_process_group

        req = schema.parse_control(await self._body(request), schema.INIT_GROUP_SCHEMA,
                                   endpoint="init_weights_update_group")
        if req["group_name"] in self._groups:
            return _json({"success": False, "message": f"group {req['group_name']!r} already "
                          f"exists; destroy it first"}, 400)
        if req["backend"] not in ("gloo", "nccl") or not 0 < req["rank_offset"] < req["world_size"]:
            return _json({"success": False, "message": "backend must be gloo or nccl and "
                          "0 < rank_offset < world_size"}, 400)

        def init():
            return init_custom_process_group(
                backend=req["backend"], master_address=req["master_address"],
                master_port=req["master_port"], rank=req["rank_offset"],
                world_size=req["world_size"], group_name=req["group_name"],
                timeout_s=self.weight_sync_timeout_s)
        try:
            group = await asyncio.get_running_loop().run_in_executor(self._sync_pool, init)
        except Exception as e:  # rendezvous failures are reported, not fatal
            return _json({"success": False, "message": f"Failed to initialize custom process "
                          f"group: {e}."}, 400)
        self._groups[req["group_name"]] = (group, req["backend"])
        return _json({"success": True, "message": "Succeeded to initialize custom process group."})

    async def destroy_weights_update_group(self, request: web.Request) -> web.Response:
        import torch.distributed as dist

        req = schema.parse_control(await self._body(request), schema.DESTROY_GROUP_SCHEMA,
                                   endpoint="destroy_weights_update_group")
        entry = self._groups.pop(req["group_name"], None)
        if entry is None:
            return _json({"success": False, "message": "The group to be destroyed does not "
                          "exist."}, 400)
        dist.destroy_process_group(entry[0])
        return _json({"success": True, "message": "Succeeded to destroy custom process group."})

    async def begin_weight_update(self, request: web.Request) -> web.Response:
        schema.parse_control(await self._body(request), schema.BEGIN_UPDATE_SCHEMA,
                             endpoint="begin_weight_update")
        if self._session_open:
            return _json({"success": False, "message": "a weight-update session is already open; "
                          "call end_weight_update() first"}, 400)
        self._session_open = True
        return _json({"success": True, "message": "Success"})

    async def end_weight_update(self, request: web.Request) -> web.Response:
        schema.parse_control(await self._body(request), schema.END_UPDATE_SCHEMA,
                             endpoint="end_weight_update")
        if not self._session_open:
            return _json({"success": False, "message": "no weight-update session is open; call "
                          "begin_weight_update() first"}, 400)
        self._session_open = False
        return _json({"success": True, "message": "Success"})

    async def update_weights_from_distributed(self, request: web.Request) -> web.Response:
        from moerl.rollout.weight_sync import receive_tensors, validate_tensor_metadata

        req = schema.parse_control(await self._body(request), schema.UPDATE_DISTRIBUTED_SCHEMA,
                                   endpoint="update_weights_from_distributed")
        if not self._session_open:
            return _json({"success": False, "message": "update_weights_from_distributed must run "
                          "between begin_weight_update() and end_weight_update()"}, 400)
        entry = self._groups.get(req["group_name"])
        if entry is None:
            return _json({"success": False, "message": f"Group {req['group_name']} not in "
                          f"{list(self._groups)}. Please call `init_weights_update_group` "
                          f"first."}, 400)
        try:
            validate_tensor_metadata(req["names"], req["dtypes"], req["shapes"],
                                     load_format=req["load_format"])
            for name, shape in zip(req["names"], req["shapes"]):
                self.writer.check(name, shape)
        except ValueError as e:
            return _json({"success": False, "message": f"Failed to receive weights: {e}"}, 400)
        group, backend = entry

        def receive() -> list:
            tensors = receive_tensors(group, req["names"], req["dtypes"], req["shapes"],
                                      load_format=req["load_format"],
                                      device="cuda" if backend == "nccl" else "cpu")
            for name, t in tensors:  # the collective is done; refuse before writing anything
                self.writer.check_values(name, t)
            return tensors
        try:
            tensors = await asyncio.get_running_loop().run_in_executor(self._sync_pool, receive)
        except Exception as e:
            return _json({"success": False, "message": f"Failed to receive weights: {e}"}, 400)
        await self._apply_weights(tensors, req["weight_version"], req["abort_all_requests"])
        return _json({"success": True, "message": "Succeeded to update parameter online."})


# ---------------------------------------------------------------------------------- CLI


def _positive(kind: type) -> Callable[[str], Any]:
    def parse(text: str):
        value = kind(text)
        if not value > 0:
            raise argparse.ArgumentTypeError(f"must be > 0, got {text}")
        return value
    parse.__name__ = kind.__name__
    return parse


def build_arg_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m moerl.rollout.server", description=__doc__.split(
        "\n")[0])
    p.add_argument("--model", required=True, help="Hugging Face MoE checkpoint directory")
    p.add_argument("--disable-return-routed-experts", action="store_true",
                   help="return no routes even when asked (as SGLang started without "
                        "--enable-return-routed-experts)")
    p.add_argument("--exit-with-parent", type=int, default=0, metavar="PID",
                   help="shut down when the process PID (the launcher) exits")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--allowed-hosts", default="",
                   help="without --api-key, requests must carry a Host header naming the bound "
                        "address or localhost; add comma-separated names here ('*': any)")
    p.add_argument("--port", type=int, default=30000, help="0 picks a free port")
    p.add_argument("--port-file", help="write the bound port here once listening")
    p.add_argument("--dtype", choices=("float32", "bfloat16", "float16"), default="float32")
    p.add_argument("--api-key", default=os.environ.get(API_KEY_ENV),
                   help=f"bearer token (default: ${API_KEY_ENV})")
    p.add_argument("--seed", type=int, default=0, help="seeds requests without sampling_seed")
    p.add_argument("--max-batch-size", type=int, default=64)
    p.add_argument("--sampling-mask-max-tokens", type=int, default=4096)
    p.add_argument("--max-request-mb", type=_positive(float), default=16.0,
                   help="largest request body accepted (> 0)")
    p.add_argument("--idle-timeout-s", type=_positive(float), default=30.0,
                   help="close a connection that sends nothing for this long")
    p.add_argument("--body-timeout-s", type=_positive(float), default=60.0,
                   help="answer 408 when a request body takes longer than this to arrive")
    p.add_argument("--max-request-tokens", type=_positive(int),
                   default=schema.Limits.max_tokens_per_request,
                   help="most tokens (prompt + max_new_tokens, summed over the sequences) one "
                        "/generate request may ask for; more is refused with 413")
    p.add_argument("--max-response-mb", type=_positive(float),
                   default=schema.Limits.max_response_bytes >> 20,
                   help="largest estimated /generate response (ids, log-probs, routes, masks); "
                        "a request that could exceed it is refused with 413")
    p.add_argument("--prompt-cache-mb", type=float, default=64.0)
    p.add_argument("--weight-version", default="default")
    p.add_argument("--weight-sync-timeout-s", type=float, default=600.0)
    p.add_argument("--num-threads", type=int, default=0, help="torch CPU threads (0: torch's)")
    p.add_argument("--log-level", default="warning",
                   choices=("debug", "info", "warning", "error"))
    return p


async def _stop_when_orphaned(parent_pid: int, stop: asyncio.Event) -> None:
    """Shut down once the launching process is gone (e.g. a trainer killed with SIGKILL), so a
    crashed run does not leave its server holding the port and the CPU. A dead parent shows up
    as this process being re-parented."""
    while not stop.is_set():
        if os.getppid() != parent_pid:
            logger.warning("parent process %d exited; shutting down", parent_pid)
            stop.set()
            return
        await asyncio.sleep(1.0)


async def _serve(args: argparse.Namespace) -> None:
    engine = Engine(args.model, dtype=args.dtype, seed=args.seed,
                    max_batch_size=args.max_batch_size,
                    sampling_mask_max_tokens=args.sampling_mask_max_tokens,
                    prompt_cache_bytes=int(args.prompt_cache_mb * (1 << 20)),
                    weight_version=args.weight_version)
    engine.start()
    server = RolloutServer(engine, api_key=args.api_key,
                           max_request_bytes=int(args.max_request_mb * (1 << 20)),
                           weight_sync_timeout_s=args.weight_sync_timeout_s,
                           return_routed_experts=not args.disable_return_routed_experts,
                           max_request_tokens=args.max_request_tokens,
                           max_response_bytes=int(args.max_response_mb * (1 << 20)),
                           allowed_hosts=http_guard.allowed_hosts(
                               args.host, api_key=args.api_key, extra=args.allowed_hosts),
                           body_timeout_s=args.body_timeout_s)
    runner = web.AppRunner(server.app(), access_log=None, shutdown_timeout=2.0,
                           **_connection_settings(args.idle_timeout_s))
    await runner.setup()
    site = web.TCPSite(runner, args.host, args.port)
    await site.start()
    port = runner.addresses[0][1]
    if args.port_file:
        tmp = Path(args.port_file + ".tmp")
        tmp.write_text(str(port))
        tmp.replace(args.port_file)
    logger.warning("moerl rollout server on http://%s:%d (model %s, %s)", args.host, port,
                   args.model, args.dtype)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    if args.exit_with_parent:
        loop.create_task(_stop_when_orphaned(args.exit_with_parent, stop))
    await stop.wait()
    logger.info("shutting down")
    await runner.cleanup()
    engine.stop()
    logger.info("stopped")


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    args = build_arg_parser().parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(),
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if any(a == "--api-key" or a.startswith("--api-key=") for a in argv):
        logger.warning("--api-key on the command line is visible to every user of this machine "
                       "(ps, /proc): pass it in $%s instead", API_KEY_ENV)
    import torch
    import transformers

    transformers.utils.logging.disable_progress_bar()
    transformers.utils.logging.set_verbosity_error()
    if args.num_threads > 0:
        torch.set_num_threads(args.num_threads)
    asyncio.run(_serve(args))
    # HTTP and the engine are shut down; skip the interpreter's slow teardown of torch/transformers.
    logging.shutdown()
    sys.stdout.flush()
    os._exit(0)


class BackgroundServer:
    """The server inside the current process (engine and HTTP on background threads), on
    loopback: for notebooks, benchmarks and tests that need a second configuration without
    paying another interpreter start. Same code path as the CLI; ``.url``, ``.api_key``,
    ``.engine``, ``.stop()``."""

    def __init__(self, model: str | Path, *, api_key: str | None = None, host: str = "127.0.0.1",
                 max_request_mb: float = 16.0, weight_sync_timeout_s: float = 600.0,
                 max_request_tokens: int = schema.Limits.max_tokens_per_request,
                 max_response_mb: float = schema.Limits.max_response_bytes >> 20,
                 allowed_hosts: str = "", idle_timeout_s: float = 30.0,
                 body_timeout_s: float = 60.0, **engine_kwargs: Any):
        import threading

        self.api_key = api_key
        self.host = host
        self._idle_timeout_s = idle_timeout_s
        self.engine = Engine(model, **engine_kwargs)
        self.engine.start()
        self._server = RolloutServer(self.engine, api_key=api_key,
                                     max_request_bytes=int(max_request_mb * (1 << 20)),
                                     weight_sync_timeout_s=weight_sync_timeout_s,
                                     max_request_tokens=max_request_tokens,
                                     max_response_bytes=int(max_response_mb * (1 << 20)),
                                     allowed_hosts=http_guard.allowed_hosts(
                                         host, api_key=api_key, extra=allowed_hosts),
                                     body_timeout_s=body_timeout_s)
        self._loop = asyncio.new_event_loop()
        self._started = threading.Event()
        self._thread = threading.Thread(target=self._run, name="moerl-http", daemon=True)
        self._thread.start()
        if not self._started.wait(60):
            raise TimeoutError("background rollout server did not start")

    def _run(self) -> None:
        asyncio.set_event_loop(self._loop)
        self._runner = web.AppRunner(self._server.app(), access_log=None, shutdown_timeout=2.0,
                                     **_connection_settings(self._idle_timeout_s))
        self._loop.run_until_complete(self._runner.setup())
        self._loop.run_until_complete(web.TCPSite(self._runner, self.host, 0).start())
        self.port = self._runner.addresses[0][1]
        self._started.set()
        self._loop.run_forever()

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def stop(self) -> None:
        asyncio.run_coroutine_threadsafe(self._runner.cleanup(), self._loop).result(30)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(30)
        self.engine.stop()


if __name__ == "__main__":
    main()
