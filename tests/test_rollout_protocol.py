"""Wire codecs, their validation errors, the MoE layout rules and the sampler's math (no server)."""

import base64
import math

import numpy as np
import pytest
import torch

from moerl.rollout import protocol as P
from moerl.rollout.engine import _weight_version_spans
from moerl.rollout.sampler import sample_with_support

# The tiny Qwen3-MoE of moerl.tiny_model: 3 layers, layer 0 dense, 8 experts top-2, vocab 64.
LAYOUT = P.MoeLayout(num_hidden_layers=3, moe_layers=(1, 2), num_experts=8, top_k=2,
                     vocab_size=64)


def routes(T, seed=0):
    rng = np.random.default_rng(seed)
    r = np.zeros((T, 3, 2), np.int32)
    for t in range(T):
        for layer in (1, 2):
            r[t, layer] = rng.choice(8, size=2, replace=False)
    return r


# ----------------------------------------------------------------------------- layouts


def test_layout_from_hf_configs_follow_each_family():
    qwen3 = {"num_hidden_layers": 4, "num_experts": 8, "num_experts_per_tok": 2,
             "vocab_size": 64, "mlp_only_layers": [0], "decoder_sparse_step": 1}
    assert P.MoeLayout.from_hf_config(qwen3).moe_layers == (1, 2, 3)
    qwen2 = {**qwen3, "mlp_only_layers": [], "decoder_sparse_step": 2}
    assert P.MoeLayout.from_hf_config(qwen2).moe_layers == (1, 3)  # (i + 1) % 2 == 0
    deepseek = {"num_hidden_layers": 5, "n_routed_experts": 16, "num_experts_per_tok": 4,
                "vocab_size": 100, "first_k_dense_replace": 2, "moe_layer_freq": 1}
    assert P.MoeLayout.from_hf_config(deepseek).moe_layers == (2, 3, 4)
    mixtral = {"num_hidden_layers": 2, "num_local_experts": 8, "num_experts_per_tok": 2,
               "vocab_size": 10}
    assert P.MoeLayout.from_hf_config(mixtral).moe_layers == (0, 1)
    with pytest.raises(ValueError, match="not a MoE model"):
        P.MoeLayout.from_hf_config({"num_hidden_layers": 2, "vocab_size": 5,
                                    "num_experts_per_tok": 1})


def test_layout_of_tiny_model_and_json_roundtrip(tmp_path):
    from moerl.tiny_model import create_tiny_hf_model

    layout = P.MoeLayout.from_hf_config(create_tiny_hf_model(tmp_path))
    assert layout == LAYOUT
    assert P.MoeLayout.from_json(layout.to_json()) == layout
    with pytest.raises(P.WireFormatError):
        P.MoeLayout.from_json({"num_hidden_layers": 3})


# ----------------------------------------------------------------------------- routes


def test_routed_experts_roundtrip_is_sglang_int32_base64():
    r = routes(6)
    text = P.encode_routed_experts(r)
    # SGLang: pybase64.b64encode(tensor.numpy().tobytes()) of the int32 [T, L, K] buffer.
    assert base64.b64decode(text) == r.astype("<i4").tobytes()
    out = P.decode_routed_experts(text, num_positions=6, layout=LAYOUT)
    assert out.dtype == torch.uint8 and out.shape == (6, 3, 2)  # route_dtype of 8 experts
    assert np.array_equal(out.numpy(), r)


@pytest.mark.parametrize("mutate, match", [
    (lambda r: r[:-1], "expected 144"),  # payload size vs token count
    (lambda r: _set(r, (2, 1, 0), 8), "out of range"),
    (lambda r: _set(r, (2, 1, 0), -1), "out of range"),
    (lambda r: _set(r, (3, 2, 1), int(r[3, 2, 0])), "duplicate expert ids"),
    (lambda r: _set(r, (slice(None), 2, slice(None)), 0), "all-zero row"),
    (lambda r: _set(r, (0, 0, 0), 5), "dense layers \\[0\\]"),
])
def test_routed_experts_validation_names_the_problem(mutate, match):
    bad = mutate(routes(6).copy())
    with pytest.raises(P.WireFormatError, match=match):
        P.decode_routed_experts(P.encode_routed_experts(bad), num_positions=6, layout=LAYOUT)


def _set(a, index, value):
    a[index] = value
    return a


def test_routed_experts_rejects_non_base64():
    with pytest.raises(P.WireFormatError, match="base64"):
        P.decode_routed_experts("not base64!!", num_positions=1, layout=LAYOUT)
    with pytest.raises(P.WireFormatError, match="base64 string"):
        P.decode_routed_experts([1, 2], num_positions=1, layout=LAYOUT)


def test_compact_routes_roundtrip_and_size():
    r = routes(10)
    compact = P.encode_routes_compact(r, LAYOUT)
    assert compact["encoding"] == "moe-u8"
    assert len(base64.b64decode(compact["b64"])) == 10 * 2 * 2  # MoE layers only, 1 byte/id
    out = P.decode_routes_compact(compact, num_positions=10, layout=LAYOUT)
    assert np.array_equal(out.numpy(), r)
    with pytest.raises(P.WireFormatError, match="expected 36"):
        P.decode_routes_compact(compact, num_positions=9, layout=LAYOUT)
    wide = P.MoeLayout(num_hidden_layers=1, moe_layers=(0,), num_experts=300, top_k=2,
                       vocab_size=10)
    r2 = np.array([[[299, 3]], [[0, 257]]], np.int32)
    c2 = P.encode_routes_compact(r2, wide)
    assert c2["encoding"] == "moe-u16"
    assert np.array_equal(P.decode_routes_compact(c2, num_positions=2, layout=wide).numpy(), r2)


# ----------------------------------------------------------------------------- masks


def test_mask_rows_to_csr_keeps_order_and_compacts_full_vocabulary_rows():
    rows = [[5, 3, 9], [7], list(range(64))[::-1]]
    ids, offsets = P.mask_rows_to_csr(rows, sampled_ids=[3, 7, 11], vocab_size=64)
    assert ids.dtype == torch.int32 and offsets.dtype == torch.int64
    assert ids.tolist() == [5, 3, 9, 7]  # the full-vocabulary row became length 0
    assert offsets.tolist() == [0, 3, 4, 4]


@pytest.mark.parametrize("rows, sampled, match", [
    ([[1, 2]], [3], "sampled token 3 is not in its mask row 0"),
    ([[1, 1]], [1], "duplicate token id 1"),
    ([[64]], [64], "out of vocabulary"),
    ([[]], [1], "non-empty list"),
    ([[1], [2]], [1], "2 rows for 1 generated tokens"),
    ([[1.5]], [1], "must be integers"),
    ("x", [1], "must be a list"),
])
def test_mask_rows_validation_names_the_problem(rows, sampled, match):
    with pytest.raises(P.WireFormatError, match=match):
        P.mask_rows_to_csr(rows, sampled_ids=sampled, vocab_size=64)


@pytest.mark.parametrize("ids, offsets, match", [
    ([1, 2], [1, 2], "starting at 0"),
    ([1, 2], [0, 2, 1], "decrease"),
    ([1, 2], [0, 1], "end at 1 but there are 2 ids"),
])
def test_csr_offsets_inconsistent(ids, offsets, match):
    with pytest.raises(P.WireFormatError, match=match):
        P.validate_mask_csr(np.array(ids), np.array(offsets), vocab_size=64)


def test_compact_mask_roundtrip_matches_list_form():
    rows = [np.array([40, 3, 17]), np.array([0]), np.arange(64), np.array([63, 62]),
            np.setdiff1d(np.arange(64), [5, 9, 60])]  # 61 of 64: sent as the 3 excluded ids
    sampled = [17, 0, 5, 63, 4]
    payload = P.encode_mask_compact(rows, vocab_size=64)
    ids, offsets = P.decode_mask_compact(payload, sampled_ids=sampled, vocab_size=64)
    ref_ids, ref_offsets = P.mask_rows_to_csr([r.tolist() for r in rows], sampled_ids=sampled,
                                              vocab_size=64)
    assert offsets.tolist() == ref_offsets.tolist() == [0, 3, 4, 4, 6, 67]
    for r in range(5):  # same sets; the compact form lists each row ascending
        a, b = ids[offsets[r]:offsets[r + 1]], ref_ids[ref_offsets[r]:ref_offsets[r + 1]]
        assert sorted(a.tolist()) == sorted(b.tolist()) == a.tolist()
    # Header 2n + 1 (excluded ids), then 3 gaps: 5, 9 - 5 - 1 = 3, 60 - 9 - 1 = 50.
    last = P._varint_decode(__import__("base64").b64decode(payload["b64"]))[-4:]
    assert last.tolist() == [7, 5, 3, 50]
    with pytest.raises(P.WireFormatError, match="sampled token 9"):
        P.decode_mask_compact(payload, sampled_ids=[17, 0, 5, 9, 4], vocab_size=64)
    with pytest.raises(P.WireFormatError, match="sampled token 60"):
        P.decode_mask_compact(payload, sampled_ids=[17, 0, 5, 63, 60], vocab_size=64)
    with pytest.raises(P.WireFormatError, match="trailing"):
        P.decode_mask_compact(payload, sampled_ids=[17, 0, 5, 63], vocab_size=64)


def test_varint_handles_large_values():
    values = np.array([0, 1, 127, 128, 300, 2**20, 2**40], dtype=np.int64)
    assert P._varint_decode(P._varint_encode(values)).tolist() == values.tolist()
    with pytest.raises(P.WireFormatError):
        P._varint_decode(bytes([0x80]))


def test_unknown_field_message_is_serdes():
    assert P.unknown_field_message("x", ("a", "b", "c")) == \
        "unknown field `x`, expected one of `a`, `b`, `c`"
    assert P.unknown_field_message("x", ("a",)) == "unknown field `x`, expected `a`"


# ----------------------------------------------------------------------------- sampler


def _logits(probs):
    return torch.log(torch.tensor([probs], dtype=torch.float64)).float()


def _sample(probs, *, top_k=1 << 30, top_p=1.0, min_p=0.0, temperature=1.0, greedy=False, u=0.5):
    return sample_with_support(
        _logits(probs), temperature_B=torch.tensor([temperature]),
        top_k_B=torch.tensor([top_k]), top_p_B=torch.tensor([top_p]),
        min_p_B=torch.tensor([min_p]), greedy_B=torch.tensor([greedy]),
        uniform_B=torch.tensor([u], dtype=torch.float64))


PROBS = [0.4, 0.3, 0.15, 0.1, 0.05]


@pytest.mark.parametrize("kwargs, kept", [
    (dict(top_k=2), [0, 1]),
    (dict(top_p=0.6), [0, 1]),  # mass before token 2 is 0.7 > 0.6
    (dict(top_p=0.75), [0, 1, 2]),  # the token that crosses top_p is kept
    (dict(min_p=0.3), [0, 1, 2]),  # threshold 0.3 * 0.4 = 0.12
    (dict(top_k=3, top_p=0.5, min_p=0.5), [0, 1]),
    # Joint filters (SGLang): top-p is measured on the untruncated distribution. Renormalising
    # after top-k first would give p' = (0.571, 0.429) and drop token 1.
    (dict(top_k=2, top_p=0.5), [0, 1]),
    (dict(), [0, 1, 2, 3, 4]),
])
def test_kept_set_follows_sglang_joint_filters(kwargs, kept):
    out = _sample(PROBS, **kwargs)
    assert out.kept_ids_M.tolist() == kept  # descending probability, as SGLang lists them
    assert out.kept_len_B.tolist() == [len(kept)]


def test_sampled_logprobs_hand_computed():
    # u = 0.99 with top_k = 2: target 0.99 * 0.7 = 0.693 falls in token 1's CDF step (0.4, 0.7].
    out = _sample(PROBS, top_k=2, u=0.99)
    assert out.token_B.tolist() == [1]
    assert out.sampling_logprob_B.item() == pytest.approx(math.log(0.3 / 0.7), abs=1e-6)
    assert out.full_logprob_B.item() == pytest.approx(math.log(0.3), abs=1e-6)
    assert out.kept_logprobs_M.tolist() == pytest.approx(
        [math.log(0.4 / 0.7), math.log(0.3 / 0.7)], abs=1e-6)
    assert _sample(PROBS, top_k=2, u=0.5).token_B.tolist() == [0]  # 0.35 < 0.4


def test_temperature_scales_both_logprobs():
    # T = 2: p_i proportional to sqrt(p_i).
    out = _sample(PROBS, temperature=2.0, top_k=2, u=0.0)
    s = [math.sqrt(p) for p in PROBS]
    assert out.token_B.tolist() == [0]
    assert out.full_logprob_B.item() == pytest.approx(math.log(s[0] / sum(s)), abs=1e-6)
    assert out.sampling_logprob_B.item() == pytest.approx(math.log(s[0] / (s[0] + s[1])),
                                                          abs=1e-6)


def test_greedy_row_reports_argmax_with_logprob_zero():
    out = _sample(PROBS, greedy=True, top_k=1, u=0.999)
    assert out.token_B.tolist() == [0] and out.kept_ids_M.tolist() == [0]
    assert out.sampling_logprob_B.item() == 0.0 and out.kept_logprobs_M.tolist() == [0.0]
    assert out.full_logprob_B.item() == pytest.approx(math.log(0.4), abs=1e-6)


def test_ties_are_broken_by_token_id():
    out = _sample([0.25, 0.25, 0.25, 0.25], top_k=2)
    assert out.kept_ids_M.tolist() == [0, 1]


# ----------------------------------------------------------------------------- weight versions


def test_weight_version_spans_follow_sglang():
    # No update while the request lived: one span over all tokens.
    assert _weight_version_spans([], "v0", 5) == [{"version": "v0", "start": 0, "end": 5}]
    # v0 for the first 3 tokens, v1 for tokens 3..7.
    assert _weight_version_spans([("v0", 3)], "v1", 7) == [
        {"version": "v0", "start": 0, "end": 3}, {"version": "v1", "start": 3, "end": 7}]
    # Two updates between the same two tokens collapse; repeated versions merge.
    assert _weight_version_spans([("v0", 3), ("v1", 3), ("v2", 5)], "v2", 6) == [
        {"version": "v0", "start": 0, "end": 3}, {"version": "v2", "start": 3, "end": 6}]


def test_information_bits():
    bits = P.information_bits_per_token(layout=LAYOUT, kept_sizes=[1, 64, 2])
    assert bits["routes_bits"] == pytest.approx(2 * 2 * 3)  # L_moe * K * log2(E)
    assert bits["routes_set_bits"] == pytest.approx(2 * math.log2(28))
    assert bits["mask_bits"] == pytest.approx((math.log2(64) + 0 + math.log2(2016)) / 3)


@pytest.mark.parametrize("values, match", [
    ([4, 3], "truncated"),  # header says 2 kept ids, one gap follows
    ([2 * 64 + 1] + [0] * 64, "excludes every token"),
    ([2, 70], "outside the vocabulary"),
    ([2, 3, 9], "trailing"),
])
def test_compact_mask_rejects_malformed_streams(values, match):
    payload = {"encoding": "varint-delta", "b64": base64.b64encode(
        P._varint_encode(np.array(values))).decode()}
    with pytest.raises(P.WireFormatError, match=match):
        P.decode_mask_compact(payload, sampled_ids=[3], vocab_size=64)


def test_topk_candidates_equal_the_full_stable_sort_prefix():
    from moerl.rollout.sampler import _sorted_candidates

    torch.manual_seed(0)
    p = torch.softmax(torch.randn(8, 300) * 3, -1)
    ps, ids = _sorted_candidates(p, torch.tensor([5, 40, 1, 7, 40, 2, 3, 9]), True)
    full_p, full_ids = torch.sort(p, dim=-1, descending=True, stable=True)
    assert ps.shape == (8, 40)
    assert torch.equal(ps, full_p[:, :40]) and torch.equal(ids, full_ids[:, :40])
    # A tie across the cutoff: topk could keep any of the tied ids, so the full sort decides.
    tied = torch.tensor([[0.3, 0.1, 0.2, 0.1, 0.1, 0.2]])
    _, ids = _sorted_candidates(tied, torch.tensor([2]), True)
    assert ids.shape == (1, 6) and ids[0, :3].tolist() == [0, 2, 5]
    _, ids = _sorted_candidates(tied, torch.tensor([3]), True)  # both 0.2s fit: no tie cut
    assert ids.tolist() == [[0, 2, 5]]
