"""Vocab-parallel log-probs with the keep sampling mask, and entropy (moerl.trainer.logprobs).

References are dense single-process computations in float64: ``log_softmax`` of the logits with
the non-kept columns set to -inf (the [N, V] mask exists only here, in the test), and autograd
through them for the gradients. The TP=2 run spawns two gloo processes under torchrun.
"""

from __future__ import annotations

import math
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

import moerl.trainer.logprobs as logprobs_module
from moerl.trainer.logprobs import vocab_parallel_entropy, vocab_parallel_logprobs

ROOT = Path(__file__).resolve().parents[1]


def _case(seed: int, num_rows: int, vocab: int, kinds: tuple[str, ...] = ("full", "one", "some")):
    """Random logits/targets and a CSR keep-mask; row n has kind ``kinds[n % len(kinds)]``:
    "full" (length 0), "one" (only the target), "some" (2..V-1 ids, target included, shuffled)."""
    gen = torch.Generator().manual_seed(seed)
    logits = torch.randn(num_rows, vocab, generator=gen) * 3.0
    targets = torch.randint(0, vocab, (num_rows,), generator=gen)
    rows = []
    for n in range(num_rows):
        kind, target = kinds[n % len(kinds)], int(targets[n])
        if kind == "full":
            rows.append([])
        elif kind == "one":
            rows.append([target])
        else:
            size = int(torch.randint(2, vocab, (1,), generator=gen))
            others = [i for i in torch.randperm(vocab, generator=gen).tolist() if i != target]
            row = others[:size - 1] + [target]
            rows.append([row[i] for i in torch.randperm(size, generator=gen).tolist()])
    ids = torch.tensor([i for r in rows for i in r], dtype=torch.int32)
    offsets = torch.zeros(num_rows + 1, dtype=torch.int64)
    offsets[1:] = torch.tensor([len(r) for r in rows], dtype=torch.int64).cumsum(0)
    return logits, targets, ids, offsets, rows


def _dense_reference(logits, targets, rows, temperature, weights):
    """float64 log-softmax over each row's kept set (all columns for empty rows), its gradient."""
    leaf = logits.double().requires_grad_()
    kept = torch.zeros(logits.shape, dtype=torch.bool)
    for n, row in enumerate(rows):
        kept[n, row if row else slice(None)] = True
    z = (leaf / temperature).masked_fill(~kept, float("-inf"))
    logp = torch.log_softmax(z, dim=-1).gather(1, targets.unsqueeze(1)).squeeze(1)
    (logp * weights.double()).sum().backward()
    return logp.detach(), leaf.grad


def _ours(logits, targets, weights, **kw):
    leaf = logits.clone().requires_grad_()
    logp = vocab_parallel_logprobs(leaf, targets, tp_group=None, **kw)
    (logp * weights).sum().backward()
    return logp.detach(), leaf.grad


def test_hand_computed_kept_set_logprob_and_gradient():
    # logits [1, 2, 3], target 1, kept {1, 2}, T = 2: z = [0.5, 1, 1.5];
    # logp = 1 - log(e^1 + e^1.5) = -log(1 + e^0.5) = -0.974077;
    # p_kept = [-, 0.377541, 0.622459]; d logp / d logits = [0, 1 - 0.377541, -0.622459] / 2.
    logits = torch.tensor([[1.0, 2.0, 3.0]], requires_grad=True)
    logp = vocab_parallel_logprobs(logits, torch.tensor([1]), tp_group=None, temperature=2.0,
                                   kept_ids_M=torch.tensor([2, 1]),
                                   kept_offsets_N1=torch.tensor([0, 2]))
    assert logp.dtype == torch.float32
    assert logp.item() == pytest.approx(-0.974077, abs=1e-6)
    logp.sum().backward()
    assert logits.grad[0].tolist() == pytest.approx([0.0, 0.311230, -0.311230], abs=1e-6)
    # Without the mask, the full vocabulary: 1 - log(e^0.5 + e^1 + e^1.5)
    # = 1 - log(1.648721 + 2.718282 + 4.481689) = 1 - 2.180270 = -1.180270.
    full = vocab_parallel_logprobs(logits, torch.tensor([1]), tp_group=None, temperature=2.0)
    assert full.item() == pytest.approx(-1.180270, abs=1e-6)


@pytest.mark.parametrize("temperature", [1.0, 0.7, 1.6])
@pytest.mark.parametrize("kinds", [("full", "one", "some"), ("some", "one"), ("some",),
                                   ("full", "some", "some", "some")])
def test_keep_mask_matches_dense_restricted_log_softmax(temperature, kinds):
    logits, targets, ids, offsets, rows = _case(11, 40, 50, kinds)
    weights = torch.randn(40, generator=torch.Generator().manual_seed(3))
    ref, ref_grad = _dense_reference(logits, targets, rows, temperature, weights)
    out, grad = _ours(logits, targets, weights, temperature=temperature, kept_ids_M=ids,
                      kept_offsets_N1=offsets)
    assert out.dtype == torch.float32 and out.shape == (40,)
    torch.testing.assert_close(out.double(), ref, rtol=0, atol=1e-5)
    torch.testing.assert_close(grad.double(), ref_grad, rtol=0, atol=1e-6)


def test_single_kept_id_gives_exactly_zero_logprob_and_gradient():
    logits, targets, ids, offsets, _ = _case(5, 12, 30, ("one",))
    out, grad = _ours(logits, targets, torch.ones(12), temperature=0.9, kept_ids_M=ids,
                      kept_offsets_N1=offsets)
    assert torch.equal(out, torch.zeros(12))
    assert torch.equal(grad, torch.zeros_like(grad))


def test_rows_without_mask_are_the_full_vocabulary():
    logits, targets, _, _, _ = _case(8, 16, 40)
    weights = torch.randn(16)
    plain, plain_grad = _ours(logits, targets, weights, temperature=1.3)
    # An all-empty CSR is "no truncation anywhere": bit-identical to passing no mask.
    empty, empty_grad = _ours(logits, targets, weights, temperature=1.3,
                              kept_ids_M=torch.zeros(0, dtype=torch.int32),
                              kept_offsets_N1=torch.zeros(17, dtype=torch.int64))
    assert torch.equal(plain, empty) and torch.equal(plain_grad, empty_grad)
    expected = torch.log_softmax(logits / 1.3, -1).gather(1, targets.unsqueeze(1)).squeeze(1)
    torch.testing.assert_close(plain, expected, rtol=0, atol=2e-6)


def test_non_contiguous_logits_take_the_same_values():
    # A column slice (what a vocab shard of a wider tensor looks like) uses the 2-D gather path.
    logits, targets, ids, offsets, _ = _case(6, 20, 30)
    wide = torch.cat([logits, torch.randn(20, 5)], dim=1)[:, :30]
    assert not wide.is_contiguous()
    weights = torch.randn(20)
    kw = dict(temperature=0.9, kept_ids_M=ids, kept_offsets_N1=offsets)
    out, grad = _ours(logits, targets, weights, **kw)
    leaf = wide.detach().requires_grad_()
    strided = vocab_parallel_logprobs(leaf, targets, tp_group=None, **kw)
    (strided * weights).sum().backward()
    assert torch.equal(out, strided.detach()) and torch.equal(grad, leaf.grad)


def test_bf16_logits_are_computed_in_fp32():
    logits, targets, ids, offsets, rows = _case(9, 24, 32)
    logits = logits.bfloat16()
    weights = torch.randn(24)
    ref, ref_grad = _dense_reference(logits.float(), targets, rows, 0.8, weights)
    out, grad = _ours(logits, targets, weights, temperature=0.8, kept_ids_M=ids,
                      kept_offsets_N1=offsets)
    assert out.dtype == torch.float32 and grad.dtype == torch.bfloat16
    torch.testing.assert_close(out.double(), ref, rtol=0, atol=1e-5)
    torch.testing.assert_close(grad.double(), ref_grad, rtol=1e-2, atol=1e-3)


def test_no_grad_and_frozen_logits():
    logits, targets, ids, offsets, rows = _case(2, 10, 20)
    with torch.no_grad():
        out = vocab_parallel_logprobs(logits, targets, tp_group=None, kept_ids_M=ids,
                                      kept_offsets_N1=offsets)
    ref, _ = _dense_reference(logits, targets, rows, 1.0, torch.ones(10))
    torch.testing.assert_close(out.double(), ref, rtol=0, atol=1e-5)
    assert not out.requires_grad


@pytest.mark.parametrize("temperature", [1.0, 0.5, 2.0])
@pytest.mark.parametrize("chunk_elements", [None, 200])  # one chunk; 3 rows a chunk, ragged end
def test_entropy_value_and_gradient(temperature, chunk_elements, monkeypatch):
    if chunk_elements is not None:
        monkeypatch.setattr(logprobs_module, "_CHUNK_ELEMENTS", chunk_elements)
    logits, _, _, _, _ = _case(4, 20, 64)
    weights = torch.randn(20)
    leaf = logits.clone().requires_grad_()
    entropy = vocab_parallel_entropy(leaf, tp_group=None, temperature=temperature)
    (entropy * weights).sum().backward()
    ref_leaf = logits.double().requires_grad_()
    logp = torch.log_softmax(ref_leaf / temperature, -1)
    ref = -(logp.exp() * logp).sum(-1)
    (ref * weights.double()).sum().backward()
    assert entropy.dtype == torch.float32
    torch.testing.assert_close(entropy.double(), ref.detach(), rtol=0, atol=2e-6)
    torch.testing.assert_close(leaf.grad.double(), ref_leaf.grad, rtol=0, atol=1e-6)


def test_entropy_hand_values():
    # Uniform logits: H = log V for any temperature; two logits [0, ln 3] at T = 1: p = [1/4, 3/4],
    # H = -(1/4 ln 1/4 + 3/4 ln 3/4) = 0.562335.
    uniform = vocab_parallel_entropy(torch.full((2, 7), 4.0), tp_group=None, temperature=0.3)
    assert uniform.tolist() == pytest.approx([math.log(7)] * 2, abs=1e-6)
    two = vocab_parallel_entropy(torch.tensor([[0.0, math.log(3)]]), tp_group=None)
    assert two.item() == pytest.approx(0.562335, abs=1e-6)


def _csr(rows):
    ids = torch.tensor([i for r in rows for i in r], dtype=torch.int64)
    offsets = torch.tensor([0] + [len(r) for r in rows]).cumsum(0)
    return ids, offsets


@pytest.mark.parametrize("ids, offsets, targets, match", [
    ([0, 1, 2], [0, 2], [0, 1], "tokens \\+ 1 = 3"),  # too few offsets
    ([0, 1, 2], [1, 2, 3], [0, 1], "malformed keep-mask offsets"),  # does not start at 0
    ([0, 1, 2], [0, 3, 2], [0, 1], "malformed keep-mask offsets"),  # decreasing
    ([0, 1, 2], [0, 1, 2], [0, 1], "malformed keep-mask offsets"),  # ends before M
    ([0, 1, 9, 2], [0, 2, 4], [0, 2], "keep-mask ids must lie in \\[0, 8\\)"),
    ([0, 1, 2], [0, 2, 3], [0, 1], "not in their keep-mask row"),  # row 1 keeps 2, target 1
    ([0, 0, 2], [0, 2, 3], [0, 2], "target token more than once"),
    ([0, 3, 3], [0, 3, 3], [0, 1], "row 0 lists token 3 more than once"),
])
def test_malformed_keep_masks_are_rejected(ids, offsets, targets, match):
    logits = torch.randn(2, 8)
    with pytest.raises(ValueError, match=match):
        vocab_parallel_logprobs(logits, torch.tensor(targets), tp_group=None,
                                kept_ids_M=torch.tensor(ids), kept_offsets_N1=torch.tensor(offsets))


def test_other_user_errors():
    logits, targets = torch.randn(3, 8), torch.tensor([0, 1, 2])
    for temperature in (0.0, -1.0, float("nan")):
        with pytest.raises(ValueError, match="temperature must be > 0"):
            vocab_parallel_logprobs(logits, targets, tp_group=None, temperature=temperature)
        with pytest.raises(ValueError, match="temperature must be > 0"):
            vocab_parallel_entropy(logits, tp_group=None, temperature=temperature)
    with pytest.raises(ValueError, match="targets must lie in"):
        vocab_parallel_logprobs(logits, torch.tensor([0, 8, 1]), tp_group=None)
    with pytest.raises(ValueError, match="given together"):
        vocab_parallel_logprobs(logits, targets, tp_group=None, kept_ids_M=torch.tensor([0]))
    with pytest.raises(ValueError, match="logits must be"):
        vocab_parallel_logprobs(logits.view(1, 3, 8), targets, tp_group=None)


class _TensorLog(TorchDispatchMode):
    """Records (op, numel, dtype) of every tensor an aten op returns in storage it newly
    allocated; views and in-place results of known storages (``known`` included) are skipped."""

    def __init__(self, *known: torch.Tensor):
        super().__init__()
        self.seen = {t.untyped_storage().data_ptr() for t in known}
        self.outputs = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor) and t.untyped_storage().data_ptr() not in self.seen:
                self.seen.add(t.untyped_storage().data_ptr())
                self.outputs.append((str(func), t.numel(), t.dtype))
        return out


def test_masked_path_never_builds_a_tokens_by_vocab_mask():
    num_rows, vocab = 64, 512
    logits, targets, ids, offsets, _ = _case(1, num_rows, vocab, ("some", "one"))
    leaf = logits.clone().requires_grad_()
    with _TensorLog(leaf) as fwd:
        logp = vocab_parallel_logprobs(leaf, targets, tp_group=None, temperature=0.7,
                                       kept_ids_M=ids, kept_offsets_N1=offsets)
    # Every row masked: the forward is O(M) (the sort of the uniqueness check included).
    largest = max(numel for _, numel, _ in fwd.outputs)
    assert largest <= max(ids.numel(), 2 * num_rows), (largest, ids.numel())
    with _TensorLog(leaf) as bwd:
        logp.sum().backward()
    big = [op for op, numel, _ in bwd.outputs if numel >= num_rows * vocab]
    assert len(big) == 1, big  # the gradient itself
    assert all(not (dtype == torch.bool and numel >= num_rows * vocab)
               for _, numel, dtype in fwd.outputs + bwd.outputs)

    # Mixed rows: the full-vocabulary rows need one fp32 [F, V] temporary, never more than N*V,
    # and still no bool [N, V].
    logits, targets, ids, offsets, _ = _case(1, num_rows, vocab, ("full", "some", "one"))
    leaf = logits.clone().requires_grad_()
    with _TensorLog(leaf) as mixed:
        vocab_parallel_logprobs(leaf, targets, tp_group=None, kept_ids_M=ids,
                                kept_offsets_N1=offsets).sum().backward()
    assert max(numel for _, numel, _ in mixed.outputs) <= num_rows * vocab
    assert all(not (dtype == torch.bool and numel >= num_rows * vocab)
               for _, numel, dtype in mixed.outputs)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_tensor_parallel_two_ranks_match_single_process():
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
           "--master_addr", "127.0.0.1", "--master_port", str(_free_port()),
           str(ROOT / "tests" / "dist" / "logprobs_tp2.py")]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=180)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-4000:]
    assert "LOGPROBS TP2 OK rank 0" in out and "LOGPROBS TP2 OK rank 1" in out, out[-4000:]
