"""Request validation for moerl's built-in server: SGLang 0.5.23's request schemas, strictly.

``/generate`` follows ``GenerateReqInput`` (``managers/io_struct.py``) and the JSON contract of
``api/v1/api_types.py``: unknown *top-level* keys are ignored (as SGLang's dataclass parse does),
unknown ``sampling_params`` keys are rejected with serde's "unknown field" text, value types are
checked like the generated decoders (``invalid type: string "x", expected f64``), and ranges like
``SamplingParams.verify``. Batches expand ``n`` prompt-major (``[p0 x n, p1 x n, ...]``), as
``TokenizerManager`` sends them. Known SGLang features the built-in engine does not implement
(text prompts, stop strings, penalties, grammars, streaming, prompt log-probs, ...) are refused
with a 400 naming the feature rather than silently ignored.

The built-in server is token-in/token-out (SGLang's ``--skip-tokenizer-init`` shape). One
deliberate relaxation: ``return_sampling_mask`` is also accepted without a finite ``top_k``
(top-p or min-p alone, or no truncation); SGLang requires ``1 <= top_k <=
--sampling-mask-max-tokens``. A realised support larger than that limit still aborts the request
with SGLang's 400 message.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Mapping

from moerl.rollout.protocol import (
    SGLANG_SAMPLING_PARAM_FIELDS,
    TOP_K_ALL,
    unknown_field_message,
)
from moerl.rollout.sampler import GREEDY_TEMPERATURE_EPS, SamplingSpec

INT64_MIN, INT64_MAX = -(2**63), 2**63 - 1


class RequestError(ValueError):
    """A client error: becomes an HTTP 4xx with ``{"error": {"message": ...}}``."""

    def __init__(self, message: str, status: int = 400):
        super().__init__(message)
        self.status = status


@dataclass(frozen=True)
class Limits:
    vocab_size: int
    context_length: int
    sampling_mask_max_tokens: int
    max_sequences_per_request: int = 4096  # prompts x n
    # What one request may cost: the tokens it makes the engine hold (prompt + max_new_tokens,
    # summed over sequences) and an upper estimate of its response's bytes.
    max_tokens_per_request: int = 1 << 20
    max_response_bytes: int = 64 << 20
    route_entries_per_token: int = 0  # MoE layers x top-k: the size of one position's routes


@dataclass(frozen=True)
class GenerateItem:
    """One sequence to generate, validated."""

    rid: str
    prompt_ids: list[int]
    sampling: SamplingSpec
    return_logprob: bool
    return_routes: bool
    routes_start_len: int
    return_mask: bool
    mask_mode: str  # "selected" | "support"
    compact: bool


def _unexpected(v: Any) -> str:
    """serde's ``Unexpected`` display, as SGLang's contract errors print it."""
    if v is None:
        return "null"
    if isinstance(v, bool):
        return f"boolean `{'true' if v else 'false'}`"
    if isinstance(v, int):
        return f"integer `{v}`"
    if isinstance(v, float):
        return f"floating point `{v}`"
    if isinstance(v, str):
        return f'string "{v[:80]}"'
    return "sequence" if isinstance(v, list) else "map" if isinstance(v, dict) else type(v).__name__


def _type_error(field: str, v: Any, expected: str) -> RequestError:
    return RequestError(f"{field}: invalid type: {_unexpected(v)}, expected {expected}")


def _int(field: str, v: Any) -> int:
    if isinstance(v, bool) or not isinstance(v, int):
        raise _type_error(field, v, "i64")
    if not INT64_MIN <= v <= INT64_MAX:
        raise RequestError(f"{field}: integer {v} out of the i64 range")
    return v


def _float(field: str, v: Any) -> float:
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        raise _type_error(field, v, "f64")
    return float(v)


def _bool(field: str, v: Any) -> bool:
    if not isinstance(v, bool):
        raise _type_error(field, v, "a boolean")
    return v


# sampling_params that the engine implements, or accepts because they only shape detokenized
# text or streaming (neither exists here), with SGLang's defaults.
_NO_EFFECT_PARAMS = {"skip_special_tokens": True, "spaces_between_special_tokens": True,
                     "no_stop_trim": False, "stream_interval": None}
# Known SGLang sampling_params the engine does not implement: only their defaults are accepted.
_UNSUPPORTED_PARAMS = {
    "stop": None, "stop_regex": None, "frequency_penalty": 0.0, "presence_penalty": 0.0,
    "repetition_penalty": 1.0, "min_new_tokens": 0, "json_schema": None, "regex": None,
    "ebnf": None, "structural_tag": None, "logit_bias": {}, "custom_params": None,
    "beam_width": None, "watermark": None, "choice": [],
}


def _check_unsupported_param(key: str, v: Any) -> None:
    default = _UNSUPPORTED_PARAMS[key]
    if v is None or v == default or (key == "beam_width" and v == 1):
        return
    if isinstance(default, float):
        _float(f"sampling_params.{key}", v)
    raise RequestError(f"sampling_params.{key}={v!r:.60} is not supported by the moerl built-in "
                       f"server (token-in/token-out, no tokenizer, no penalties or grammars); "
                       f"leave it at its default {default!r}")


def parse_sampling_params(sp: Any, *, prompt_len: int, limits: Limits) -> tuple[SamplingSpec, int]:
    """Validate one ``sampling_params`` object; returns the spec and ``n``."""
    if sp is None:
        sp = {}
    if not isinstance(sp, dict):
        raise _type_error("sampling_params", sp, "struct SamplingParams")
    for key in sp:
        if key not in SGLANG_SAMPLING_PARAM_FIELDS:
            raise RequestError("sampling_params: " + unknown_field_message(
                key, SGLANG_SAMPLING_PARAM_FIELDS))
        if key in _UNSUPPORTED_PARAMS:
            _check_unsupported_param(key, sp[key])
    for key, default in _NO_EFFECT_PARAMS.items():
        if sp.get(key) is not None and key != "stream_interval":
            _bool(f"sampling_params.{key}", sp[key])
    get = lambda k, d: d if sp.get(k) is None else sp[k]  # noqa: E731  (SGLang: null = default)
    temperature = _float("sampling_params.temperature", get("temperature", 1.0))
    top_p = _float("sampling_params.top_p", get("top_p", 1.0))
    top_k = _int("sampling_params.top_k", get("top_k", TOP_K_ALL))
    min_p = _float("sampling_params.min_p", get("min_p", 0.0))
    n = _int("sampling_params.n", get("n", 1))
    ignore_eos = _bool("sampling_params.ignore_eos", get("ignore_eos", False))
    if not math.isfinite(temperature) or temperature < 0:
        raise RequestError(f"temperature must be a non-negative finite number, got {temperature}.")
    if not 0.0 < top_p <= 1.0:
        raise RequestError(f"top_p must be in (0, 1], got {top_p}.")
    if not 0.0 <= min_p <= 1.0:
        raise RequestError(f"min_p must be in [0, 1], got {min_p}.")
    if top_k < 1 and top_k != -1:
        raise RequestError(f"top_k must be -1 (disable) or at least 1, got {top_k}.")
    if not 1 <= n <= limits.max_sequences_per_request:
        raise RequestError(f"n must be in [1, {limits.max_sequences_per_request}], got {n}.")
    # Absent: SGLang's default 128, capped by the context (SGLang validates only explicit values);
    # explicit null: up to the context length.
    max_new = sp.get("max_new_tokens", min(128, limits.context_length - prompt_len))
    max_new = limits.context_length - prompt_len if max_new is None else _int(
        "sampling_params.max_new_tokens", max_new)
    if max_new < 0:
        raise RequestError(f"max_new_tokens must be at least 0, got {max_new}.")
    if prompt_len + max_new > limits.context_length:
        raise RequestError(
            f"Requested token count exceeds the model's maximum context length of "
            f"{limits.context_length} tokens. You requested a total of {prompt_len + max_new} "
            f"tokens: {prompt_len} tokens from the input messages and {max_new} tokens for the "
            f"completion. Please reduce the number of tokens in the input messages or the "
            f"completion to fit within the limit.")
    stop = sp.get("stop_token_ids")
    if stop is not None:
        if not isinstance(stop, list):
            raise _type_error("sampling_params.stop_token_ids", stop, "a sequence")
        stop = [_int("sampling_params.stop_token_ids", t) for t in stop]
        if any(not 0 <= t < limits.vocab_size for t in stop):
            raise RequestError(f"stop_token_ids must be in [0, {limits.vocab_size}), got {stop}")
    seed = sp.get("sampling_seed")
    seed = None if seed is None else _int("sampling_params.sampling_seed", seed)
    # SGLang's SamplingParams.__post_init__: temperature ~ 0 is greedy (top_k = 1, temperature 1).
    if temperature < GREEDY_TEMPERATURE_EPS:
        temperature, top_k = 1.0, 1
    top_k = TOP_K_ALL if top_k == -1 else top_k
    return SamplingSpec(temperature=temperature, top_k=top_k, top_p=top_p, min_p=min_p,
                        greedy=top_k == 1, max_new_tokens=max_new,
                        stop_token_ids=frozenset(stop or ()), ignore_eos=ignore_eos,
                        seed=seed), n


def _parse_input_ids(value: Any, limits: Limits) -> tuple[list[list[int]], bool]:
    if value is None:
        raise RequestError("input_ids is required: the moerl built-in server is token-in/token-out "
                           "(no tokenizer), so text prompts are not supported")
    if not isinstance(value, list):
        raise _type_error("input_ids", value, "a list of token ids or a list of such lists")
    if not value:
        raise RequestError("input_ids cannot be empty.")
    single = not isinstance(value[0], list)
    prompts = [value] if single else value
    if len(prompts) > limits.max_sequences_per_request:
        raise RequestError(f"too many prompts in one request: {len(prompts)} > "
                           f"{limits.max_sequences_per_request}", status=413)
    for i, prompt in enumerate(prompts):
        where = "input_ids" if single else f"input_ids[{i}]"
        if not isinstance(prompt, list):
            raise _type_error(where, prompt, "a list of token ids")
        if not prompt:
            raise RequestError(f"{where} cannot be empty.")
        for t in prompt:
            if isinstance(t, bool) or not isinstance(t, int):
                raise _type_error(where, t, "i64 token id")
            if not 0 <= t < limits.vocab_size:
                raise RequestError(f"{where} contains out-of-vocabulary token id {t}; valid range "
                                   f"is [0, {limits.vocab_size}).")
        if len(prompt) >= limits.context_length:
            raise RequestError(f"The input ({len(prompt)} tokens) is longer than the model's "
                               f"context length ({limits.context_length} tokens).")
    return prompts, single


# Top-level GenerateReqInput fields the engine does not implement: accepted only when falsy/default.
_UNSUPPORTED_TOP_LEVEL = ("text", "input_embeds", "image_data", "video_data", "audio_data",
                          "stream", "return_hidden_states", "lora_path", "session_params",
                          "session_id", "custom_logit_processor", "return_indexer_topk",
                          "return_entropy", "return_prompt_token_ids", "top_logprobs_num",
                          "token_ids_logprob", "return_text_in_logprobs",
                          "return_flat_raw_top_logprobs", "return_flat_raw_output_top_logprobs",
                          "return_flat_raw_top_logprobs_b64")


def _per_item(body: Mapping, key: str, num: int, default: Any, parse) -> list:
    """A field that is either one value or a list with one value per prompt (SGLang's rule)."""
    value = body.get(key)
    if value is None:
        return [default] * num
    if isinstance(value, list):
        if len(value) != num:
            raise RequestError(f"{key} has {len(value)} entries for {num} prompts")
        return [default if v is None else parse(key, v) for v in value]
    return [parse(key, value)] * num


def parse_generate_request(body: Any, *, limits: Limits) -> tuple[list[GenerateItem], bool]:
    """Validate a ``/generate`` body; returns the expanded items and whether it was a single
    request (answered with one object instead of a list)."""
    if not isinstance(body, dict):
        raise _type_error("request body", body, "struct GenerateRequest")
    for key in _UNSUPPORTED_TOP_LEVEL:
        if body.get(key):
            raise RequestError(f"{key} is not supported by the moerl built-in server "
                               f"(token-in/token-out, non-streaming)")
    if body.get("logprob_start_len") not in (None, -1):
        raise RequestError("logprob_start_len (prompt log-probs) is not supported by the moerl "
                           "built-in server; omit it to get output log-probs")
    prompts, single = _parse_input_ids(body.get("input_ids"), limits)
    num = len(prompts)
    sps = body.get("sampling_params")
    if isinstance(sps, list):
        if len(sps) != num:
            raise RequestError(f"sampling_params has {len(sps)} entries for {num} prompts")
    else:
        sps = [sps] * num
    parsed = [parse_sampling_params(sp, prompt_len=len(p), limits=limits)
              for sp, p in zip(sps, prompts)]
    n = parsed[0][1]
    if any(pn != n for _, pn in parsed):
        raise RequestError("The parallel_sample_num should be the same for all samples in sample "
                           "params.")
    if num * n > limits.max_sequences_per_request:
        raise RequestError(f"{num} prompts x n={n} exceeds {limits.max_sequences_per_request} "
                           f"sequences per request", status=413)
    return_logprob = _per_item(body, "return_logprob", num, False, _bool)
    return_mask = _per_item(body, "return_sampling_mask", num, False, _bool)
    modes = _per_item(body, "sampling_logprobs_mode", num, None, _parse_mode)
    # Absent or null means the default; any other value must have the right type ("" is not 0).
    return_routes = _bool("return_routed_experts", _given(body, "return_routed_experts", False))
    start_len = _int("routed_experts_start_len", _given(body, "routed_experts_start_len", 0))
    compact = _bool("moerl_compact", _given(body, "moerl_compact", False))
    rids = _parse_rids(body.get("rid"), num, n)
    items = []
    for i, (prompt, (spec, _)) in enumerate(zip(prompts, parsed)):
        if modes[i] is not None and not return_mask[i]:
            raise RequestError("sampling_logprobs_mode can only be set when "
                               "return_sampling_mask=true.")
        cap = limits.sampling_mask_max_tokens
        if return_mask[i] and spec.top_k != TOP_K_ALL and spec.top_k > cap:
            raise RequestError(
                f"return_sampling_mask requires top_k=1 for greedy sampling or finite 1 < top_k "
                f"<= {limits.sampling_mask_max_tokens}; got top_k={spec.top_k}. Lower top_k or "
                f"increase --sampling-mask-max-tokens.")
        if return_routes and not 0 <= start_len <= len(prompt):
            raise RequestError(f"routed_experts_start_len={start_len} must be in [0, "
                               f"{len(prompt)}] (the number of input tokens)")
        for j in range(n):
            items.append(GenerateItem(
                rid=rids[i * n + j], prompt_ids=list(prompt), sampling=spec,
                return_logprob=return_logprob[i], return_routes=return_routes,
                routes_start_len=start_len, return_mask=return_mask[i],
                mask_mode=modes[i] or "selected", compact=compact))
    _check_cost(items, limits)
    return items, single and n == 1


def _given(body: dict, key: str, default: Any) -> Any:
    value = body.get(key)
    return default if value is None else value


def _check_cost(items: list[GenerateItem], limits: Limits) -> None:
    """Refuse, before any work, a request whose tokens or response would exceed the limits."""
    tokens = sum(len(it.prompt_ids) + it.sampling.max_new_tokens for it in items)
    if tokens > limits.max_tokens_per_request:
        raise RequestError(
            f"this request asks for {tokens} tokens (prompt + max_new_tokens over {len(items)} "
            f"sequences), more than the server's limit of {limits.max_tokens_per_request} "
            f"(--max-request-tokens): split it, or lower n or max_new_tokens", status=413)
    size = sum(_response_bytes(it, limits) for it in items)
    if size > limits.max_response_bytes:
        raise RequestError(
            f"this request's response could reach {size >> 20} MiB, more than the server's limit "
            f"of {limits.max_response_bytes >> 20} MiB (--max-response-mb): split it, lower n or "
            f"max_new_tokens, or ask for fewer routes/masks", status=413)


def _response_bytes(item: GenerateItem, limits: Limits) -> int:
    """A generous upper estimate of one sequence's share of the JSON response."""
    out = item.sampling.max_new_tokens
    size = 256 + 8 * out  # meta_info and the output ids
    if item.return_logprob:
        size += 48 * out
    if item.return_routes:
        positions = len(item.prompt_ids) + out - item.routes_start_len
        size += positions * limits.route_entries_per_token * (2 if item.compact else 4)
    if item.return_mask:
        kept = min(limits.vocab_size, item.sampling.top_k, limits.sampling_mask_max_tokens)
        size += out * kept * (2 if item.compact else 7)
    return size


def _parse_mode(key: str, v: Any) -> str:
    if v not in ("selected", "support"):
        raise RequestError(f"{key} must be 'selected' or 'support', got {v!r:.40}")
    return v


def _parse_rids(value: Any, num: int, n: int) -> list[str]:
    import uuid

    if value is None:
        return [uuid.uuid4().hex for _ in range(num * n)]
    if isinstance(value, str):
        return [value] if num * n == 1 else [f"{value}_{i}" for i in range(num * n)]
    if isinstance(value, list) and all(isinstance(r, str) for r in value):
        if len(value) != num:
            raise RequestError("The specified rids length mismatch with the batch_size for batch "
                               "processing.")
        if len(set(value)) != len(value):
            raise RequestError(f"Duplicate request IDs detected within the request: {value}")
        return [r if n == 1 else f"{r}_{j}" for r in value for j in range(n)]
    raise RequestError("The rid should be a string or a list of strings.")


# ---------------------------------------------------------------------------------------------
# Control endpoints (weights, pause): SGLang's request classes, unknown keys rejected.
# ---------------------------------------------------------------------------------------------


def parse_control(body: Any, schema: Mapping[str, tuple[str, Any]], *, endpoint: str) -> dict:
    """Validate a control-endpoint body against ``{field: (kind, default)}``; a default of
    ``...`` marks a required field. Kinds: str, int, bool, str?, list[str], list[list[int]]."""
    if body is None:
        body = {}
    if not isinstance(body, dict):
        raise _type_error(f"{endpoint} body", body, "a JSON object")
    for key in body:
        if key not in schema:
            raise RequestError(f"{endpoint}: " + unknown_field_message(key, tuple(schema)))
    out = {}
    for key, (kind, default) in schema.items():
        if key not in body or (body[key] is None and kind.endswith("?")):
            if default is ...:
                raise RequestError(f"{endpoint}: missing field `{key}`")
            out[key] = default
            continue
        out[key] = _check_kind(f"{endpoint}.{key}", body[key], kind.rstrip("?"))
    return out


def _check_kind(field: str, v: Any, kind: str) -> Any:
    if kind == "str":
        if not isinstance(v, str):
            raise _type_error(field, v, "a string")
        return v
    if kind == "int":
        return _int(field, v)
    if kind == "bool":
        return _bool(field, v)
    if kind == "list[str]":
        if not isinstance(v, list) or not all(isinstance(x, str) for x in v):
            raise _type_error(field, v, "a list of strings")
        return v
    if kind == "list[list[int]]":
        if not isinstance(v, list) or not all(isinstance(x, list) for x in v):
            raise _type_error(field, v, "a list of integer lists")
        return [[_int(field, d) for d in x] for x in v]
    raise AssertionError(kind)


PAUSE_SCHEMA = {"mode": ("str", "abort"), "rid": ("str?", None), "http_worker_ipc": ("str?", None)}
CONTINUE_SCHEMA = {"torch_empty_cache": ("bool", True), "rid": ("str?", None),
                   "http_worker_ipc": ("str?", None)}
UPDATE_FROM_DISK_SCHEMA = {
    "model_path": ("str", ...), "load_format": ("str?", None),
    "abort_all_requests": ("bool", False),
    "weight_version": ("str?", None), "is_async": ("bool", False),
    "torch_empty_cache": ("bool", False), "keep_pause": ("bool", False),
    "recapture_cuda_graph": ("bool", False), "token_step": ("int", 0),
    "flush_cache": ("bool", True), "rid": ("str?", None), "http_worker_ipc": ("str?", None),
}
INIT_GROUP_SCHEMA = {
    "master_address": ("str", ...), "master_port": ("int", ...), "rank_offset": ("int", ...),
    "world_size": ("int", ...), "group_name": ("str", "weight_update_group"),
    "backend": ("str", "nccl"), "rid": ("str?", None), "http_worker_ipc": ("str?", None),
}
DESTROY_GROUP_SCHEMA = {"group_name": ("str", "weight_update_group"), "rid": ("str?", None),
                        "http_worker_ipc": ("str?", None)}
UPDATE_DISTRIBUTED_SCHEMA = {
    "names": ("list[str]", ...), "dtypes": ("list[str]", ...), "shapes": ("list[list[int]]", ...),
    "group_name": ("str", "weight_update_group"), "flush_cache": ("bool", True),
    "abort_all_requests": ("bool", False), "weight_version": ("str?", None),
    "load_format": ("str?", None), "selector": ("str", "all"),
    "torch_empty_cache": ("bool", False), "rid": ("str?", None), "http_worker_ipc": ("str?", None),
}
BEGIN_UPDATE_SCHEMA = {"selector": ("str", "all"), "rid": ("str?", None),
                       "http_worker_ipc": ("str?", None)}
END_UPDATE_SCHEMA = {"rid": ("str?", None), "http_worker_ipc": ("str?", None)}
UPDATE_VERSION_SCHEMA = {"new_version": ("str", ...), "abort_all_requests": ("bool", True),
                         "rid": ("str?", None), "http_worker_ipc": ("str?", None)}
