"""The rollout wire contract: SGLang 0.5.23's native ``/generate`` JSON, decoded for the trainer.

Shape-suffix legend (see ``moerl.batch``): T positions with routes (prompt + response - 1 -
``routed_experts_start_len``), L hidden layers (all of them, as on the wire), K experts per token,
R generated tokens, M total ids in a CSR sampling mask, V vocabulary.

Everything here mirrors SGLang 0.5.23 (``managers/io_struct.py``, ``managers/tokenizer_manager.py``,
``state_capturer/routed_experts.py``, ``sampling/sampling_mask.py``, ``layers/sampler.py``,
``api/v1/api_types.py``); field names and encodings are SGLang's own:

- ``meta_info.output_token_logprobs``: ``[[logprob, token_id, null], ...]`` per generated token,
  the log-prob under the *full-vocabulary*, temperature-scaled distribution
  ``log_softmax(logits / temperature)`` (SGLang's default; ``SGLANG_RETURN_ORIGINAL_LOGPROB``
  would drop the temperature). Greedy requests (temperature 0, which SGLang turns into
  ``top_k = 1, temperature = 1``) report ``log_softmax(logits)``.
- ``meta_info.routed_experts``: base64 of little-endian int32, C order, shape
  ``[len(prompt) + len(output) - 1 - routed_experts_start_len, num_hidden_layers, top_k]``. The
  final token never went through the model. Every hidden layer has a slot; SGLang's capture
  buffer is zero-initialised and only MoE layers are written, so dense layers are rows of zeros.
  Logical expert ids (no EPLB/redundant experts). Sent only in the finished response.
- ``meta_info.output_token_sampling_mask``: per generated token, the list of token ids with
  positive weight after top-k/top-p/min-p (the sampler's support), in SGLang's order (descending
  probability). ``output_token_sampling_logprobs``: in ``selected`` mode (the default) one float
  per token, the sampled token's log-prob under the truncated, renormalised distribution; in
  ``support`` mode one list per token aligned with the mask row. Greedy rows are ``[token]`` with
  log-prob ``0.0``. SGLang has no special encoding for an untruncated ("full vocabulary") row: it
  only admits ``return_sampling_mask`` with ``top_k = 1`` or a finite ``1 < top_k <=
  --sampling-mask-max-tokens`` (4096), so a full-vocabulary row can only occur when ``top_k >=
  vocab_size``, and then it lists every token with positive probability. The CSR the client hands
  the trainer (``Sample.mask_ids_M`` / ``mask_offsets_R1``) encodes a row that lists the whole
  vocabulary as a row of length 0 ("no truncation"), which is ``moerl.batch.Sample``'s convention.
- ``meta_info.finish_reason``: ``{"type": "stop", "matched": id}``, ``{"type": "length",
  "length": n}`` or ``{"type": "abort", "message", "status_code", "err_type"}``.
- ``meta_info.weight_version`` and ``meta_info.weight_versions``: the version string, and spans
  ``{"version", "start", "end"}`` of output tokens generated under each version (a request that
  lived through a weight update has more than one span).

moerl's optional additions (offered only by moerl's built-in server, advertised in its
``/model_info`` under ``moerl.compact_encodings``, requested with the top-level request field
``moerl_compact: true``, which an SGLang server ignores as it ignores every unknown top-level key):

- ``meta_info.moerl_routed_experts = {"encoding": "moe-u8"|"moe-u16", "b64": ...}``: only the MoE
  layers, one byte (or little-endian uint16 when ``num_experts > 256``) per expert id, shape
  ``[T, num_moe_layers, K]``. Replaces ``routed_experts``.
- ``meta_info.moerl_sampling_mask = {"encoding": "varint-delta", "b64": ...}``: per row an
  LEB128 varint header ``h`` followed by ``n`` sorted ids as varint gaps (``id[0]``, then
  ``id[i] - id[i-1] - 1``): ``h = 0`` is the whole vocabulary, ``h = 2n`` lists the ``n`` kept
  ids, ``h = 2n + 1`` lists the ``n`` *excluded* ids (used when fewer than half are excluded).
  Replaces ``output_token_sampling_mask``; ``output_token_sampling_logprobs`` stays as in SGLang
  (``selected`` mode only).

Every decoder validates what it reads and raises :class:`WireFormatError` (a ``ValueError``)
naming what is wrong.
"""

from __future__ import annotations

import base64
import binascii
import json
import math
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np
import torch

from moerl.routes import route_dtype

SGLANG_VERSION = "0.5.23"
# SGLang's stand-in for "no top-k" (``sampling_params.TOP_K_ALL``); -1 is normalised to it.
TOP_K_ALL = 1 << 30
# SGLang's ``--sampling-mask-max-tokens`` default.
DEFAULT_SAMPLING_MASK_MAX_TOKENS = 4096

# SGLang 0.5.23 ``api/v1/api_types.py`` ``_FIELDS_SamplingParams``, in its order: the JSON contract
# rejects any other key with serde's "unknown field" text, which moerl reproduces.
SGLANG_SAMPLING_PARAM_FIELDS = (
    "max_new_tokens", "stop", "stop_token_ids", "stop_regex", "temperature", "top_p", "top_k",
    "min_p", "frequency_penalty", "presence_penalty", "repetition_penalty", "min_new_tokens", "n",
    "json_schema", "regex", "ebnf", "structural_tag", "ignore_eos", "skip_special_tokens",
    "spaces_between_special_tokens", "no_stop_trim", "stream_interval", "logit_bias",
    "sampling_seed", "custom_params", "beam_width", "watermark", "choice",
)

COMPACT_ROUTES_ENCODINGS = ("moe-u8", "moe-u16")
COMPACT_MASK_ENCODING = "varint-delta"


class WireFormatError(ValueError):
    """A rollout response (or a moerl-encoded payload) violates the wire contract."""


def unknown_field_message(key: str, fields: Sequence[str]) -> str:
    """serde's ``unknown_field`` text, which SGLang's JSON contract returns as the 400 body."""
    if not fields:
        return f"unknown field `{key}`, there are no fields"
    if len(fields) == 1:
        return f"unknown field `{key}`, expected `{fields[0]}`"
    if len(fields) == 2:
        return f"unknown field `{key}`, expected `{fields[0]}` or `{fields[1]}`"
    listed = ", ".join(f"`{f}`" for f in fields)
    return f"unknown field `{key}`, expected one of {listed}"


# --------------------------------------------------------------------------------------------
# Model facts needed to validate routes and masks.
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class MoeLayout:
    """What the wire format leaves implicit: layer count, which layers are MoE, E, K and V.

    SGLang's ``/model_info`` does not report these, so a client talking to SGLang builds the layout
    from the model's Hugging Face config (:meth:`from_hf_config`); moerl's built-in server also
    reports it under ``/model_info``'s ``moerl.layout``.
    """

    num_hidden_layers: int
    moe_layers: tuple[int, ...]  # indices of the MoE layers, ascending
    num_experts: int
    top_k: int
    vocab_size: int

    def __post_init__(self) -> None:
        if self.num_hidden_layers <= 0 or self.num_experts <= 0 or self.top_k <= 0:
            raise ValueError(f"invalid MoE layout {self}")
        if self.top_k > self.num_experts:
            raise ValueError(f"top_k={self.top_k} exceeds num_experts={self.num_experts}")
        if self.vocab_size <= 0:
            raise ValueError(f"invalid vocab_size {self.vocab_size}")
        layers = tuple(int(i) for i in self.moe_layers)
        if list(layers) != sorted(set(layers)) or any(not 0 <= i < self.num_hidden_layers
                                                     for i in layers):
            raise ValueError(f"moe_layers {layers} must be distinct, ascending and in "
                             f"[0, {self.num_hidden_layers})")
        object.__setattr__(self, "moe_layers", layers)

    @property
    def dense_layers(self) -> tuple[int, ...]:
        moe = set(self.moe_layers)
        return tuple(i for i in range(self.num_hidden_layers) if i not in moe)

    @classmethod
    def from_hf_config(cls, config: Any) -> "MoeLayout":
        """Layout of a Hugging Face MoE config (a ``PretrainedConfig``, a dict, or a model dir).

        Which layers are MoE follows the modelling code of each family: Qwen2/Qwen3-MoE
        (``mlp_only_layers``, ``decoder_sparse_step``), DeepSeek-V2/V3 (``first_k_dense_replace``,
        ``moe_layer_freq``); any other config is taken to have MoE in every layer (Mixtral, OLMoE).
        """
        if isinstance(config, (str, Path)):
            config = json.loads((Path(config) / "config.json").read_text())
        cfg = config if isinstance(config, Mapping) else config.to_dict()
        cfg = cfg.get("text_config") or cfg
        num_layers = int(cfg["num_hidden_layers"])
        num_experts = next((int(cfg[k]) for k in ("num_experts", "n_routed_experts",
                                                  "num_local_experts") if cfg.get(k)), 0)
        if num_experts <= 0:
            raise ValueError("config has no num_experts / n_routed_experts / num_local_experts: "
                             "not a MoE model")
        if "mlp_only_layers" in cfg or "decoder_sparse_step" in cfg:
            dense = set(cfg.get("mlp_only_layers") or [])
            step = int(cfg.get("decoder_sparse_step") or 1)
            moe = [i for i in range(num_layers) if i not in dense and (i + 1) % step == 0]
        elif "first_k_dense_replace" in cfg:
            first = int(cfg["first_k_dense_replace"])
            freq = int(cfg.get("moe_layer_freq") or 1)
            moe = [i for i in range(num_layers) if i >= first and i % freq == 0]
        else:
            moe = list(range(num_layers))
        return cls(num_hidden_layers=num_layers, moe_layers=tuple(moe), num_experts=num_experts,
                   top_k=int(cfg["num_experts_per_tok"]), vocab_size=int(cfg["vocab_size"]))

    def to_json(self) -> dict:
        return {**asdict(self), "moe_layers": list(self.moe_layers)}

    @classmethod
    def from_json(cls, value: Any) -> "MoeLayout":
        if not isinstance(value, Mapping):
            raise WireFormatError(f"MoE layout must be an object, got {type(value).__name__}")
        try:
            return cls(num_hidden_layers=int(value["num_hidden_layers"]),
                       moe_layers=tuple(int(i) for i in value["moe_layers"]),
                       num_experts=int(value["num_experts"]), top_k=int(value["top_k"]),
                       vocab_size=int(value["vocab_size"]))
        except (KeyError, TypeError, ValueError) as e:
            raise WireFormatError(f"invalid MoE layout {value!r}: {e}") from e


# --------------------------------------------------------------------------------------------
# Routed experts.
# --------------------------------------------------------------------------------------------


def _b64decode(text: Any, what: str) -> bytes:
    if not isinstance(text, str):
        raise WireFormatError(f"{what} must be a base64 string, got {type(text).__name__}")
    try:
        return base64.b64decode(text.encode("ascii"), validate=True)
    except (binascii.Error, UnicodeEncodeError) as e:
        raise WireFormatError(f"{what} is not valid base64: {e}") from e


def encode_routed_experts(routes_TLK: np.ndarray | torch.Tensor) -> str:
    """SGLang's encoding: base64 of the C-ordered little-endian int32 bytes."""
    if isinstance(routes_TLK, torch.Tensor):
        routes_TLK = routes_TLK.numpy()
    return base64.b64encode(np.ascontiguousarray(routes_TLK, dtype="<i4").tobytes()).decode("ascii")


def validate_routes(routes_TLK: np.ndarray, layout: MoeLayout) -> None:
    """Check expert ids per MoE layer: in range, distinct within a row, layer actually captured.

    Dense layers must be all zeros (SGLang never writes them); a non-zero dense layer means the
    client's layout does not match the server's model. A row of K zeros in a MoE layer (K >= 2)
    is what SGLang's zero-initialised buffer holds for a layer that was not captured. With K = 1
    an uncaptured layer is indistinguishable from "expert 0", so that case cannot be checked.
    """
    T, L, K = routes_TLK.shape
    if L != layout.num_hidden_layers or K != layout.top_k:
        raise WireFormatError(f"routes have {L} layers x top-{K}; the model has "
                              f"{layout.num_hidden_layers} layers x top-{layout.top_k}")
    if T == 0:
        return
    dense = list(layout.dense_layers)
    if dense and np.any(routes_TLK[:, dense, :]):
        bad = [i for i in dense if np.any(routes_TLK[:, i, :])]
        raise WireFormatError(f"dense layers {bad} carry non-zero expert ids: the MoE layout "
                              f"(moe_layers={list(layout.moe_layers)}) does not match the server's")
    moe_TLK = routes_TLK[:, list(layout.moe_layers), :]
    out_of_range = (moe_TLK < 0) | (moe_TLK >= layout.num_experts)
    if np.any(out_of_range):
        t, l, k = np.argwhere(out_of_range)[0]
        raise WireFormatError(
            f"expert id {int(moe_TLK[t, l, k])} out of range [0, {layout.num_experts}) at "
            f"position {int(t)}, layer {layout.moe_layers[int(l)]}")
    if K >= 2:
        zero_rows = np.all(moe_TLK == 0, axis=-1)
        if np.any(zero_rows):
            t, l = np.argwhere(zero_rows)[0]
            raise WireFormatError(
                f"MoE layer {layout.moe_layers[int(l)]} has an all-zero row at position {int(t)}"
                f" ({int(zero_rows[:, l].sum())} of {T} rows): the layer was not captured")
        sorted_TLK = np.sort(moe_TLK, axis=-1)
        dup = np.any(sorted_TLK[..., 1:] == sorted_TLK[..., :-1], axis=-1)
        if np.any(dup):
            t, l = np.argwhere(dup)[0]
            raise WireFormatError(
                f"duplicate expert ids {moe_TLK[t, l].tolist()} in one row at position {int(t)}, "
                f"layer {layout.moe_layers[int(l)]}")


def decode_routed_experts(payload: Any, *, num_positions: int, layout: MoeLayout) -> torch.Tensor:
    """Decode and validate SGLang's ``routed_experts`` into ``[T, L, K]`` of
    ``moerl.routes.route_dtype`` (the smallest integer type holding the expert ids)."""
    raw = _b64decode(payload, "routed_experts")
    expected = num_positions * layout.num_hidden_layers * layout.top_k
    if len(raw) != 4 * expected:
        raise WireFormatError(
            f"routed_experts has {len(raw)} bytes ({len(raw) / 4:g} int32); expected {4 * expected}"
            f" = {num_positions} positions x {layout.num_hidden_layers} layers x top-"
            f"{layout.top_k} x 4 bytes")
    routes_TLK = np.frombuffer(raw, dtype="<i4").reshape(
        num_positions, layout.num_hidden_layers, layout.top_k)
    validate_routes(routes_TLK, layout)
    return torch.from_numpy(routes_TLK.astype(np.int32)).to(route_dtype(layout.num_experts))


def encode_routes_compact(routes_TLK: np.ndarray, layout: MoeLayout) -> dict:
    """moerl's compact routes: MoE layers only, uint8 (uint16 above 256 experts)."""
    dtype, name = ("u1", "moe-u8") if layout.num_experts <= 256 else ("<u2", "moe-u16")
    moe_TLK = np.ascontiguousarray(routes_TLK[:, list(layout.moe_layers), :]).astype(dtype)
    return {"encoding": name, "b64": base64.b64encode(moe_TLK.tobytes()).decode("ascii")}


def decode_routes_compact(payload: Any, *, num_positions: int, layout: MoeLayout) -> torch.Tensor:
    """Inverse of :func:`encode_routes_compact`, back to SGLang's ``[T, L_all, K]`` layout (dense
    layers zero) in ``moerl.routes.route_dtype``."""
    if not isinstance(payload, Mapping) or payload.get("encoding") not in COMPACT_ROUTES_ENCODINGS:
        raise WireFormatError(f"moerl_routed_experts must be an object with encoding in "
                              f"{COMPACT_ROUTES_ENCODINGS}, got {payload!r:.200}")
    width = 1 if payload["encoding"] == "moe-u8" else 2
    raw = _b64decode(payload.get("b64"), "moerl_routed_experts.b64")
    num_moe = len(layout.moe_layers)
    expected = num_positions * num_moe * layout.top_k * width
    if len(raw) != expected:
        raise WireFormatError(f"moerl_routed_experts has {len(raw)} bytes; expected {expected} = "
                              f"{num_positions} positions x {num_moe} MoE layers x top-"
                              f"{layout.top_k} x {width} bytes")
    moe_TLK = np.frombuffer(raw, dtype="u1" if width == 1 else "<u2").reshape(
        num_positions, num_moe, layout.top_k)
    routes_TLK = np.zeros((num_positions, layout.num_hidden_layers, layout.top_k), np.int32)
    routes_TLK[:, list(layout.moe_layers), :] = moe_TLK
    validate_routes(routes_TLK, layout)
    return torch.from_numpy(routes_TLK).to(route_dtype(layout.num_experts))


# --------------------------------------------------------------------------------------------
# Sampling masks.
# --------------------------------------------------------------------------------------------


def validate_mask_csr(ids_M: np.ndarray, offsets_R1: np.ndarray, *, vocab_size: int,
                      sampled_R: np.ndarray | None = None) -> None:
    """Check a CSR sampling mask: offsets consistent, ids in range and distinct per row, and the
    sampled token in its row (rows of length 0 mean "whole vocabulary" and always contain it)."""
    offsets_R1 = np.asarray(offsets_R1)
    ids_M = np.asarray(ids_M)
    if offsets_R1.ndim != 1 or offsets_R1.size == 0 or offsets_R1[0] != 0:
        raise WireFormatError(f"mask offsets must be a 1-D array starting at 0, got "
                              f"{offsets_R1[:8].tolist()}")
    if np.any(np.diff(offsets_R1) < 0):
        raise WireFormatError("mask offsets decrease")
    if offsets_R1[-1] != ids_M.size:
        raise WireFormatError(f"mask offsets end at {int(offsets_R1[-1])} but there are "
                              f"{ids_M.size} ids")
    num_rows = offsets_R1.size - 1
    if sampled_R is not None and len(sampled_R) != num_rows:
        raise WireFormatError(f"mask has {num_rows} rows for {len(sampled_R)} generated tokens")
    if ids_M.size == 0:
        return
    if ids_M.min() < 0 or ids_M.max() >= vocab_size:
        bad = ids_M[(ids_M < 0) | (ids_M >= vocab_size)][0]
        raise WireFormatError(f"mask token id {int(bad)} out of vocabulary [0, {vocab_size})")
    lengths_R = np.diff(offsets_R1)
    row_M = np.repeat(np.arange(num_rows), lengths_R)
    order = np.lexsort((ids_M, row_M))
    same = (row_M[order][1:] == row_M[order][:-1]) & (ids_M[order][1:] == ids_M[order][:-1])
    if np.any(same):
        j = int(np.argmax(same))
        raise WireFormatError(f"duplicate token id {int(ids_M[order][j])} in mask row "
                              f"{int(row_M[order][j])}")
    if sampled_R is not None:
        hits_R = np.bincount(row_M, weights=(ids_M == np.asarray(sampled_R)[row_M]),
                             minlength=num_rows)
        missing = (hits_R == 0) & (lengths_R > 0)
        if np.any(missing):
            r = int(np.argmax(missing))
            raise WireFormatError(f"sampled token {int(sampled_R[r])} is not in its mask row {r} "
                                  f"(row has {int(lengths_R[r])} ids)")


def mask_rows_to_csr(rows: Any, *, sampled_ids: Sequence[int], vocab_size: int
                     ) -> tuple[torch.Tensor, torch.Tensor]:
    """SGLang's ``output_token_sampling_mask`` (id lists) -> CSR (int32 ids, int64 offsets).

    A row listing the whole vocabulary becomes a row of length 0 (``Sample``'s "no truncation").
    """
    if not isinstance(rows, list):
        raise WireFormatError(f"output_token_sampling_mask must be a list, got "
                              f"{type(rows).__name__}")
    if len(rows) != len(sampled_ids):
        raise WireFormatError(f"output_token_sampling_mask has {len(rows)} rows for "
                              f"{len(sampled_ids)} generated tokens")
    lengths = []
    for r, row in enumerate(rows):
        if not isinstance(row, list) or not row:
            raise WireFormatError(f"sampling mask row {r} must be a non-empty list of token ids, "
                                  f"got {row!r:.80}")
        lengths.append(len(row))
    flat = [t for row in rows for t in row]
    if not set(map(type, flat)) <= {int}:
        bad = next(t for t in flat if type(t) is not int)
        raise WireFormatError(f"sampling mask ids must be integers, got {bad!r:.40}")
    ids_M = np.asarray(flat, dtype=np.int64)
    offsets_R1 = np.zeros(len(rows) + 1, dtype=np.int64)
    np.cumsum(lengths, out=offsets_R1[1:])
    sampled_R = np.asarray(sampled_ids, dtype=np.int64)
    validate_mask_csr(ids_M, offsets_R1, vocab_size=vocab_size, sampled_R=sampled_R)
    return _compact_full_rows(ids_M, offsets_R1, vocab_size)


def _compact_full_rows(ids_M: np.ndarray, offsets_R1: np.ndarray, vocab_size: int
                       ) -> tuple[torch.Tensor, torch.Tensor]:
    # After validation a row of V distinct in-range ids is exactly the whole vocabulary.
    lengths_R = np.diff(offsets_R1)
    full_R = lengths_R == vocab_size
    if np.any(full_R):
        keep_M = ~np.repeat(full_R, lengths_R)
        ids_M = ids_M[keep_M]
        lengths_R = np.where(full_R, 0, lengths_R)
        offsets_R1 = np.concatenate([[0], np.cumsum(lengths_R)])
    return (torch.from_numpy(ids_M.astype(np.int32)),
            torch.from_numpy(offsets_R1.astype(np.int64)))


def _varint_encode(values: np.ndarray) -> bytes:
    values = np.asarray(values, dtype=np.uint64)
    out = bytearray()
    for v in values.tolist():
        while v >= 0x80:
            out.append((v & 0x7F) | 0x80)
            v >>= 7
        out.append(v)
    return bytes(out)


def _varint_decode(raw: bytes) -> np.ndarray:
    b = np.frombuffer(raw, dtype=np.uint8)
    if b.size == 0:
        return np.zeros(0, dtype=np.int64)
    if b[-1] & 0x80:
        raise WireFormatError("varint stream ends in the middle of a number")
    last = (b & 0x80) == 0
    group = np.concatenate([[0], np.cumsum(last)[:-1]])
    starts = np.flatnonzero(np.concatenate([[True], last[:-1]]))
    shift = (np.arange(b.size) - starts[group]) * 7
    if shift.max() > 56:
        raise WireFormatError("varint longer than 9 bytes")
    parts = (b & 0x7F).astype(np.uint64) << shift.astype(np.uint64)
    return np.add.reduceat(parts, starts).astype(np.int64)


def _complement(ids: np.ndarray, vocab_size: int) -> np.ndarray:
    """The vocabulary ids not in ``ids``, ascending."""
    present = np.zeros(vocab_size, dtype=bool)
    present[ids] = True
    return np.flatnonzero(~present)


def encode_mask_compact(rows: Sequence[np.ndarray], *, vocab_size: int) -> dict:
    """moerl's compact mask (see the module docstring): kept or excluded ids as varint gaps."""
    values: list[np.ndarray] = []
    for row in rows:
        row = np.sort(np.asarray(row, dtype=np.int64))
        if row.size == vocab_size:
            values.append(np.zeros(1, np.int64))
            continue
        excluded = row.size > vocab_size - row.size
        listed = _complement(row, vocab_size) if excluded else row
        gaps = np.diff(listed, prepend=-1) - 1
        values.append(np.concatenate([[2 * listed.size + int(excluded)], gaps]))
    stream = _varint_encode(np.concatenate(values)) if values else b""
    return {"encoding": COMPACT_MASK_ENCODING, "b64": base64.b64encode(stream).decode("ascii")}


def decode_mask_compact(payload: Any, *, sampled_ids: Sequence[int], vocab_size: int
                        ) -> tuple[torch.Tensor, torch.Tensor]:
    """Inverse of :func:`encode_mask_compact`, validated, as CSR (int32 ids, int64 offsets).

    Rows sent as "whole vocabulary" (header 0) come out as rows of length 0.
    """
    if not isinstance(payload, Mapping) or payload.get("encoding") != COMPACT_MASK_ENCODING:
        raise WireFormatError(f"moerl_sampling_mask must be an object with encoding "
                              f"'{COMPACT_MASK_ENCODING}', got {payload!r:.200}")
    values = _varint_decode(_b64decode(payload.get("b64"), "moerl_sampling_mask.b64"))
    num_rows = len(sampled_ids)
    headers = np.zeros(num_rows, dtype=np.int64)
    starts = np.zeros(num_rows, dtype=np.int64)
    pos = 0
    for r in range(num_rows):  # headers are sequential; everything else is vectorised
        if pos >= values.size:
            raise WireFormatError(f"moerl_sampling_mask has {r} rows for {num_rows} generated "
                                  f"tokens")
        headers[r], starts[r] = values[pos], pos + 1
        pos += 1 + int(values[pos]) // 2
    if pos != values.size:
        raise WireFormatError(f"moerl_sampling_mask has {values.size - pos} trailing values after "
                              f"{num_rows} rows" if pos < values.size else
                              f"moerl_sampling_mask row {num_rows - 1} is truncated")
    listed_R = headers // 2
    total = int(listed_R.sum())
    first_R = np.cumsum(listed_R) - listed_R
    index = np.arange(total) + np.repeat(starts - first_R, listed_R)
    steps = np.cumsum(values[index] + 1)
    # Per-row cumulative sum of (gap + 1), minus one: the listed ids, ascending.
    listed_ids = steps - np.repeat(np.concatenate([[0], steps])[first_R], listed_R) - 1
    if total and listed_ids.max() >= vocab_size:
        raise WireFormatError(f"moerl_sampling_mask lists id {int(listed_ids.max())} outside the "
                              f"vocabulary [0, {vocab_size})")
    chunks = np.split(listed_ids, np.cumsum(listed_R)[:-1])
    for r in np.flatnonzero(headers % 2 == 1):  # rows sent as their excluded ids
        if listed_R[r] >= vocab_size:
            raise WireFormatError(f"moerl_sampling_mask row {int(r)} excludes every token")
        chunks[r] = _complement(chunks[r], vocab_size)
    lengths_R = np.array([c.size for c in chunks], dtype=np.int64)
    ids_M = np.concatenate(chunks) if chunks else np.zeros(0, np.int64)
    offsets_R1 = np.concatenate([[0], np.cumsum(lengths_R)])
    validate_mask_csr(ids_M, offsets_R1, vocab_size=vocab_size,
                      sampled_R=np.asarray(sampled_ids, dtype=np.int64))
    return _compact_full_rows(ids_M, offsets_R1, vocab_size)


# --------------------------------------------------------------------------------------------
# One /generate output -> the fields of a moerl.batch.Sample.
# --------------------------------------------------------------------------------------------


@dataclass
class DecodedOutput:
    """One decoded ``/generate`` output: the wire fields a ``Sample`` is built from."""

    response_ids: list[int]
    full_logprobs_R: torch.Tensor  # float32 [R]
    sampling_logprobs_R: torch.Tensor | None  # float32 [R], when masks were returned
    finish_reason: str  # "stop" | "length" | "abort"
    finish_detail: dict
    weight_version: str
    weight_versions: list[dict]
    routes_TLK: torch.Tensor | None
    mask_ids_M: torch.Tensor | None
    mask_offsets_R1: torch.Tensor | None


def _finish_reason(meta: Mapping) -> tuple[str, dict]:
    reason = meta.get("finish_reason")
    if not isinstance(reason, Mapping) or reason.get("type") not in ("stop", "length", "abort"):
        raise WireFormatError(f"meta_info.finish_reason must be an object with type stop/length/"
                              f"abort, got {reason!r:.200}")
    return str(reason["type"]), dict(reason)


def _output_logprobs(meta: Mapping, response_ids: list[int]) -> torch.Tensor:
    entries = meta.get("output_token_logprobs")
    if not isinstance(entries, list) or len(entries) != len(response_ids):
        raise WireFormatError(
            f"output_token_logprobs must list one [logprob, token_id, text] per generated token "
            f"({len(response_ids)}), got {type(entries).__name__} of length "
            f"{len(entries) if isinstance(entries, list) else 'n/a'}")
    values = []
    for i, (entry, token) in enumerate(zip(entries, response_ids)):
        if (not isinstance(entry, list) or len(entry) != 3 or type(entry[1]) is not int
                or not isinstance(entry[0], (int, float)) or isinstance(entry[0], bool)):
            raise WireFormatError(f"output_token_logprobs[{i}] must be [logprob, token_id, text], "
                                  f"got {entry!r:.80}")
        if entry[1] != token:
            raise WireFormatError(f"output_token_logprobs[{i}] is for token {entry[1]} but "
                                  f"output_ids[{i}] is {token}")
        values.append(float(entry[0]))
    logprobs_R = torch.tensor(values, dtype=torch.float32)
    if not torch.all(torch.isfinite(logprobs_R) & (logprobs_R <= 1e-4)):
        raise WireFormatError("output_token_logprobs must be finite and <= 0")
    return logprobs_R


def _sampling_logprobs(meta: Mapping, num_tokens: int, mask_rows: Any,
                       response_ids: list[int]) -> torch.Tensor:
    values = meta.get("output_token_sampling_logprobs")
    if not isinstance(values, list) or len(values) != num_tokens:
        raise WireFormatError(f"output_token_sampling_logprobs must have one entry per generated "
                              f"token ({num_tokens}), got {values!r:.80}")
    if values and isinstance(values[0], list):
        # "support" mode: one log-prob per id of the mask row; take the sampled token's.
        if not isinstance(mask_rows, list):
            raise WireFormatError("support-mode sampling log-probs need the list-form mask")
        picked = []
        for i, (row_lp, row_ids, token) in enumerate(zip(values, mask_rows, response_ids)):
            if not isinstance(row_lp, list) or len(row_lp) != len(row_ids):
                raise WireFormatError(f"output_token_sampling_logprobs[{i}] does not align with "
                                      f"its mask row")
            picked.append(row_lp[row_ids.index(token)])
        values = picked
    if any(not isinstance(v, (int, float)) or isinstance(v, bool) for v in values):
        raise WireFormatError("output_token_sampling_logprobs must be numbers")
    logprobs_R = torch.tensor(values, dtype=torch.float32)
    if not torch.all(torch.isfinite(logprobs_R) & (logprobs_R <= 1e-4)):
        raise WireFormatError("output_token_sampling_logprobs must be finite and <= 0")
    return logprobs_R


def decode_generate_output(out: Any, *, prompt_len: int, layout: MoeLayout | None,
                           want_logprobs: bool = True, want_routes: bool, want_mask: bool,
                           routed_experts_start_len: int = 0) -> DecodedOutput:
    """Decode one element of a ``/generate`` response into validated tensors.

    ``layout`` is required when routes or masks are wanted (the vocabulary size bounds mask ids).
    """
    if not isinstance(out, Mapping) or not isinstance(out.get("meta_info"), Mapping):
        raise WireFormatError(f"a /generate output must be an object with meta_info, got "
                              f"{out!r:.200}")
    meta = out["meta_info"]
    response_ids = out.get("output_ids")
    if not isinstance(response_ids, list) or any(type(t) is not int for t in response_ids):
        raise WireFormatError("output_ids must be a list of integers")
    if layout is not None and any(not 0 <= t < layout.vocab_size for t in response_ids):
        raise WireFormatError(f"output_ids contain ids outside the vocabulary [0, "
                              f"{layout.vocab_size})")
    finish, detail = _finish_reason(meta)
    version = meta.get("weight_version")
    version = "" if version is None else str(version)
    spans = meta.get("weight_versions") or []
    if finish == "abort":
        # SGLang's abort path (``_handle_abort_req``) sends no routes or masks: nothing to decode,
        # the caller regenerates the sample.
        empty = torch.zeros(0)
        return DecodedOutput(response_ids=response_ids, full_logprobs_R=empty,
                             sampling_logprobs_R=None, finish_reason=finish, finish_detail=detail,
                             weight_version=version, weight_versions=list(spans), routes_TLK=None,
                             mask_ids_M=None, mask_offsets_R1=None)
    if want_logprobs:
        full_R = _output_logprobs(meta, response_ids)
    else:
        full_R = torch.full((len(response_ids),), float("nan"))
    routes_TLK = mask_ids_M = mask_offsets_R1 = sampling_R = None
    if want_routes or want_mask:
        if layout is None:
            raise ValueError("decoding routes or masks needs the model's MoeLayout")
    if want_routes:
        num_positions = max(prompt_len + len(response_ids) - 1 - routed_experts_start_len, 0)
        if "moerl_routed_experts" in meta:
            routes_TLK = decode_routes_compact(meta["moerl_routed_experts"],
                                               num_positions=num_positions, layout=layout)
        elif "routed_experts" in meta:
            routes_TLK = decode_routed_experts(meta["routed_experts"],
                                               num_positions=num_positions, layout=layout)
        else:
            raise WireFormatError("routes were requested but meta_info has no routed_experts "
                                  "(is the SGLang server started with "
                                  "--enable-return-routed-experts?)")
    if want_mask:
        rows = meta.get("output_token_sampling_mask")
        if "moerl_sampling_mask" in meta:
            mask_ids_M, mask_offsets_R1 = decode_mask_compact(
                meta["moerl_sampling_mask"], sampled_ids=response_ids,
                vocab_size=layout.vocab_size)
        elif rows is not None:
            mask_ids_M, mask_offsets_R1 = mask_rows_to_csr(
                rows, sampled_ids=response_ids, vocab_size=layout.vocab_size)
        elif response_ids:
            raise WireFormatError("sampling masks were requested but meta_info has no "
                                  "output_token_sampling_mask")
        else:
            mask_ids_M = torch.zeros(0, dtype=torch.int32)
            mask_offsets_R1 = torch.zeros(1, dtype=torch.int64)
        sampling_R = (_sampling_logprobs(meta, len(response_ids), rows, response_ids)
                      if response_ids else torch.zeros(0))
    return DecodedOutput(response_ids=response_ids, full_logprobs_R=full_R,
                         sampling_logprobs_R=sampling_R, finish_reason=finish,
                         finish_detail=detail, weight_version=version,
                         weight_versions=list(spans), routes_TLK=routes_TLK,
                         mask_ids_M=mask_ids_M, mask_offsets_R1=mask_offsets_R1)


def information_bits_per_token(*, layout: MoeLayout, kept_sizes: Sequence[int]) -> dict:
    """Raw information content, for the wire-size benchmark: routes as ``L_moe * K * log2(E)``
    bits per token (ordered ids; the unordered set needs ``L_moe * log2(C(E, K))``), masks as
    ``log2(C(V, k_t))`` bits for a kept set of size ``k_t`` (averaged over tokens)."""
    num_moe = len(layout.moe_layers)
    route_bits = num_moe * layout.top_k * math.log2(layout.num_experts)
    route_set_bits = num_moe * math.log2(math.comb(layout.num_experts, layout.top_k))
    V = layout.vocab_size
    mask_bits = [math.log2(math.comb(V, k)) if 0 < k < V else 0.0 for k in kept_sizes]
    return {"routes_bits": route_bits, "routes_set_bits": route_set_bits,
            "mask_bits": float(np.mean(mask_bits)) if mask_bits else 0.0}
