"""Vocab-parallel token log-probs (optionally over the rollout's kept set) and entropy.

Shape-suffix legend (see ``moerl.batch``):
  N  tokens (the trainer flattens [b, s] row-major; nothing here depends on the order)
  V  this tensor-parallel rank's vocabulary shard (the full vocabulary when TP = 1)
  M  kept-token ids in a CSR keep-mask (all rows together)
  F  rows with no keep-mask ("full vocabulary" rows)

Keep sampling mask (DeepSeek-V3.2, sec. "Scaling GRPO"; ``DESIGN.md`` "Keep sampling mask"): the
rollout sampled each token from a truncated distribution (top-k/top-p/min-p), so pi_theta is
evaluated on the same support:

    logp = z[y] - logsumexp(z[kept]),    z = logits / temperature,

with ``kept`` the sampler's support at that position, given as CSR (``kept_ids_M`` + offsets). A
row of length 0 means "no truncation": the full-vocabulary ``log_softmax(z)[y]``. The target is
always in its kept set, so a row with one kept id has ``logp == 0`` and no gradient.

Vocab parallelism follows Megatron's ``vocab_parallel_cross_entropy``: rank r of ``tp_group``
holds columns ``[r * V, (r + 1) * V)``. Every rank computes per-row partial results over its
columns: a shift (the row max over the full shard, or over the kept ids that fall in the shard)
and a sum of ``exp(z - shift)``; one MAX all-reduce of the shifts and one SUM all-reduce of
(partial sums, target logit) give the global logsumexp. Kept ids are gathered, never expanded into
a ``[N, V]`` mask: the masked rows cost O(M) in the forward, and in the backward only the gradient
tensor itself is ``[N, V]``. Full-vocabulary rows cost one fp32 ``[F, V]`` temporary in the forward
(Megatron materialises ``exp(logits)`` the same way); a batch that mixes masked and full rows runs
the backward's softmax pass over all rows, which writes exact zeros on the masked ones, so the
gradient stays the only ``[N, V]`` allocation. Saved for the backward: the logits, O(N) row
statistics and O(M) gathered logits and indices. The backward is analytic (no autograd through
the collectives), on the local shard only:

    d logp / d z_j = 1[j == y] - p_kept(j) * 1[j in kept],   d z / d logits = 1 / temperature.

Conventions the paper leaves open:
- Entropy is always over the full distribution softmax(z) (with temperature), never the kept set.
- Duplicate ids in a kept row are rejected (``ValueError``); counting an id twice would silently
  reweight it. The exact check sorts the M ids, so ``check_unique=False`` skips it for callers
  whose masks were already validated (``moerl.rollout.protocol.validate_mask_csr`` rejects
  duplicates when it decodes the wire); a duplicated *target* is caught either way.
- A target outside its kept row breaks the contract (the rollout client guarantees it) and raises.
- ``temperature`` must be > 0: greedy rollouts are not trained on.

Host synchronisation: validation reads a few scalars back (offsets monotone and ending at M, ids
and targets in range, targets kept, the uniqueness verdict; one ``nonzero`` to find full rows when
a batch mixes masked and unmasked rows): at most six syncs per call, none per element; the
collectives themselves need none. All checks look only at
``targets`` and the CSR, which are identical on every TP rank, so every rank raises together
before any collective is entered (a check on one rank only would hang the others).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch.distributed import ProcessGroup

__all__ = ["vocab_parallel_logprobs", "vocab_parallel_entropy"]


def _tp_rank_size(tp_group: ProcessGroup | None) -> tuple[int, int]:
    if tp_group is None:
        return 0, 1
    return dist.get_rank(tp_group), dist.get_world_size(tp_group)


def _all_reduce(t: torch.Tensor, op: dist.ReduceOp, tp_group: ProcessGroup | None) -> None:
    if tp_group is not None and dist.get_world_size(tp_group) > 1:
        dist.all_reduce(t, op=op, group=tp_group)


def _scaled_fp32(logits_RV: torch.Tensor, temperature: float) -> torch.Tensor:
    """A fresh fp32 copy of ``logits / temperature``: the one ``[R, V]`` temporary we allow."""
    z_RV = torch.empty(logits_RV.shape, dtype=torch.float32, device=logits_RV.device)
    z_RV.copy_(logits_RV)
    if temperature != 1.0:
        z_RV.div_(temperature)
    return z_RV


def _check_inputs(logits_NV: torch.Tensor, temperature: float) -> None:
    if not temperature > 0:  # also rejects NaN
        raise ValueError(f"temperature must be > 0 (greedy rollouts are not trained on), "
                         f"got {temperature}")
    if logits_NV.dim() != 2:
        raise ValueError(f"logits must be [tokens, vocab shard], got shape "
                         f"{tuple(logits_NV.shape)}")
    if not logits_NV.is_floating_point():
        raise ValueError(f"logits must be floating point, got {logits_NV.dtype}")


@dataclass(frozen=True)
class _KeepMask:
    """A validated CSR keep-mask with at least one masked row, one (row, global id) per kept id."""

    row_M: torch.Tensor  # int64 row of each kept id
    ids_M: torch.Tensor  # int64 global token id
    full_rows_F: torch.Tensor | None  # int64 rows without a mask; None when there are none


def _validate_keep_mask(kept_ids_M: torch.Tensor, kept_offsets_N1: torch.Tensor,
                        targets_N: torch.Tensor, *, vocab_size: int, check_unique: bool
                        ) -> _KeepMask | None:
    """Raise ValueError on a malformed mask; None when no row is masked (full vocabulary)."""
    num_rows = targets_N.numel()
    if kept_ids_M.dim() != 1 or kept_offsets_N1.dim() != 1:
        raise ValueError(f"keep-mask ids and offsets must be 1-D, got shapes "
                         f"{tuple(kept_ids_M.shape)} and {tuple(kept_offsets_N1.shape)}")
    if kept_ids_M.is_floating_point() or kept_offsets_N1.is_floating_point():
        raise ValueError(f"keep-mask ids and offsets must be integers, got {kept_ids_M.dtype} "
                         f"and {kept_offsets_N1.dtype}")
    if kept_offsets_N1.numel() != num_rows + 1:
        raise ValueError(f"keep-mask offsets must have tokens + 1 = {num_rows + 1} entries, got "
                         f"{kept_offsets_N1.numel()}")
    offsets_N1 = kept_offsets_N1.to(torch.int64)
    num_kept = kept_ids_M.numel()
    lengths_N = offsets_N1.diff()
    first, last, min_length = torch.stack(
        [offsets_N1[0], offsets_N1[-1], lengths_N.min() if num_rows else offsets_N1[0]]).tolist()
    if first != 0 or last != num_kept or min_length < 0:
        raise ValueError(f"malformed keep-mask offsets: they must start at 0, never decrease and "
                         f"end at the number of kept ids ({num_kept}); got first={first}, "
                         f"last={last}, smallest row length={min_length}")

    ids_M = kept_ids_M.to(torch.int64)
    row_M = torch.repeat_interleave(torch.arange(num_rows, device=ids_M.device), lengths_N,
                                    output_size=num_kept)
    # Per masked row the number of kept ids equal to the target: 1 is the contract, 0 means the
    # target was not kept, 2+ a duplicated target.
    hits_N = torch.zeros(num_rows, dtype=torch.int64, device=ids_M.device)
    hits_N.index_add_(0, row_M, (ids_M == targets_N[row_M]).to(torch.int64))
    masked_N = lengths_N > 0
    ids_lo, ids_hi = (ids_M.aminmax() if num_kept else
                      (torch.zeros((), dtype=torch.int64, device=ids_M.device),) * 2)
    stats = torch.stack([ids_lo, ids_hi, (masked_N & (hits_N == 0)).sum(), (hits_N > 1).sum(),
                         masked_N.sum()]).tolist()  # one host sync for all five checks
    ids_lo, ids_hi, num_not_kept, num_dup_target, num_masked = stats
    if num_kept and (ids_lo < 0 or ids_hi >= vocab_size):
        raise ValueError(f"keep-mask ids must lie in [0, {vocab_size}), got range "
                         f"[{ids_lo}, {ids_hi}]")
    if num_not_kept:
        row = int((masked_N & (hits_N == 0)).nonzero()[0])
        raise ValueError(f"{num_not_kept} target token(s) are not in their keep-mask row (first: "
                         f"row {row}, target {int(targets_N[row])}); the rollout client must "
                         f"always keep the sampled token")
    if num_dup_target:
        raise ValueError(f"{num_dup_target} keep-mask row(s) list the target token more than once")
    if check_unique and num_kept:
        keys_M = row_M * vocab_size + ids_M
        if num_rows * vocab_size < 2**31:
            keys_M = keys_M.to(torch.int32)  # sorts about twice as fast as int64 on CPU
        keys_M = torch.sort(keys_M).values
        dup_M = keys_M[1:] == keys_M[:-1]
        if bool(dup_M.any()):
            key = int(keys_M[1:][dup_M][0])
            raise ValueError(f"keep-mask row {key // vocab_size} lists token {key % vocab_size} "
                             f"more than once")

    if num_masked == 0:
        return None
    full_rows_F = (~masked_N).nonzero().squeeze(1) if num_masked < num_rows else None
    return _KeepMask(row_M=row_M, ids_M=ids_M, full_rows_F=full_rows_F)


def _check_targets(targets_N: torch.Tensor, num_rows: int, vocab_size: int) -> None:
    if targets_N.dim() != 1 or targets_N.numel() != num_rows:
        raise ValueError(f"targets must be [tokens] = [{num_rows}], got shape "
                         f"{tuple(targets_N.shape)}")
    if targets_N.is_floating_point() or targets_N.dtype == torch.bool:
        raise ValueError(f"targets must be integer token ids, got {targets_N.dtype}")
    if num_rows:
        lo, hi = targets_N.aminmax()
        lo, hi = torch.stack([lo, hi]).tolist()
        if lo < 0 or hi >= vocab_size:
            raise ValueError(f"targets must lie in [0, {vocab_size}), got range [{lo}, {hi}]")


class _VocabParallelLogprobs(torch.autograd.Function):
    """``z[y] - logsumexp(z over the row's support)`` per row, support = kept ids or the full
    vocabulary; see the module docstring for the reductions and the backward. ``keep`` is None
    when every row is a full-vocabulary row."""

    @staticmethod
    def forward(ctx, logits_NV, targets_N, keep, temperature, tp_group, valid):
        num_rows, shard = logits_NV.shape
        start = _tp_rank_size(tp_group)[0] * shard
        device = logits_NV.device

        # Shift per row: max over its support within this shard, -inf where the shard holds none.
        shift_N = torch.full((num_rows,), float("-inf"), dtype=torch.float32, device=device)
        z_FV = None
        if keep is None:
            z_FV = _scaled_fp32(logits_NV, temperature)
            z_FV[:, valid:] = float("-inf")  # vocabulary padding: no probability mass
            shift_N = z_FV.amax(dim=1)
        elif keep.full_rows_F is not None:
            # index_select already made a fresh copy: scale that one in place.
            z_FV = logits_NV.index_select(0, keep.full_rows_F).float()
            if temperature != 1.0:
                z_FV.div_(temperature)
            z_FV[:, valid:] = float("-inf")
            shift_N.index_copy_(0, keep.full_rows_F, z_FV.amax(dim=1))
        if keep is not None:
            in_shard_M = (keep.ids_M >= start) & (keep.ids_M < start + shard)
            col_M = (keep.ids_M - start).clamp_(0, shard - 1)
            flat_M = keep.row_M * shard + col_M
            # Ids of other shards gather a clamped column and are then set to -inf: fixed shapes,
            # no host sync, and exp(-inf) = 0 drops them from every sum below. index_select on
            # the flat view is several times faster than 2-D advanced indexing on CPU.
            kept_z_M = (logits_NV.view(-1).index_select(0, flat_M) if logits_NV.is_contiguous()
                        else logits_NV[keep.row_M, col_M]).float()
            if temperature != 1.0:
                kept_z_M.div_(temperature)
            kept_z_M.masked_fill_(~in_shard_M, float("-inf"))
            shift_N.scatter_reduce_(0, keep.row_M, kept_z_M, reduce="amax", include_self=True)
        _all_reduce(shift_N, dist.ReduceOp.MAX, tp_group)

        # sums_2N[0]: partial sum of exp(z - shift) over the support; sums_2N[1]: z[y] on the
        # shard that holds y, 0 elsewhere. One all-reduce for both.
        sums_2N = torch.zeros(2, num_rows, dtype=torch.float32, device=device)
        if keep is None:
            sums_2N[0] = z_FV.sub_(shift_N.unsqueeze(1)).exp_().sum(dim=1)
        elif keep.full_rows_F is not None:
            z_FV.sub_(shift_N[keep.full_rows_F].unsqueeze(1)).exp_()
            sums_2N[0].index_copy_(0, keep.full_rows_F, z_FV.sum(dim=1))
        del z_FV
        if keep is not None:
            sums_2N[0].index_add_(0, keep.row_M, (kept_z_M - shift_N[keep.row_M]).exp_())
        target_in_shard_N = (targets_N >= start) & (targets_N < start + shard)
        target_col_N = (targets_N - start).clamp_(0, shard - 1)
        target_z_N = logits_NV.gather(1, target_col_N.unsqueeze(1)).squeeze(1).float()
        if temperature != 1.0:
            target_z_N.div_(temperature)
        sums_2N[1] = target_z_N.masked_fill_(~target_in_shard_N, 0.0)
        _all_reduce(sums_2N, dist.ReduceOp.SUM, tp_group)

        # logsumexp = shift + log(sum) is kept in two parts: shift is an exact logit on every
        # rank, and the rounding of the sum (which depends on the shard split) then only touches
        # the small log(sum), not a logsumexp of magnitude |z|.
        sum_N = sums_2N[0]
        ctx.temperature = temperature
        ctx.valid = valid
        # What the backward needs of the mask: O(M) floats and indices, no id list.
        ctx.masked = keep is not None
        ctx.full_rows = keep is None or keep.full_rows_F is not None
        saved = [logits_NV, shift_N, sum_N, target_col_N, target_in_shard_N]
        if keep is not None:
            saved += [kept_z_M, flat_M, keep.row_M]
            if keep.full_rows_F is not None:
                saved.append(keep.full_rows_F)
        ctx.save_for_backward(*saved)
        return (sums_2N[1] - shift_N) - sum_N.log()

    @staticmethod
    def backward(ctx, grad_N):
        logits_NV, shift_N, sum_N, target_col_N, target_in_shard_N = ctx.saved_tensors[:5]
        temperature = ctx.temperature
        num_rows, shard = logits_NV.shape
        scale_N = grad_N.float() / temperature
        if ctx.full_rows:
            # -softmax(z) * scale = -exp(z - shift) * (scale / sum) on full rows; masked rows get
            # shift = +inf so exp gives exact 0 there, which keeps the gradient the only [N, V]
            # tensor of the backward.
            dense_shift_N = shift_N
            if ctx.masked:
                full_rows_F = ctx.saved_tensors[8]
                dense_shift_N = torch.full_like(shift_N, float("inf"))
                dense_shift_N[full_rows_F] = shift_N[full_rows_F]
            grad_NV = _scaled_fp32(logits_NV, temperature)
            grad_NV[:, ctx.valid:] = float("-inf")  # padding: exp gives 0, no gradient
            grad_NV.sub_(dense_shift_N.unsqueeze(1)).exp_().mul_((-scale_N / sum_N).unsqueeze(1))
        else:
            grad_NV = torch.zeros((num_rows, shard), dtype=torch.float32, device=logits_NV.device)
        flat_grad = grad_NV.view(-1)
        if ctx.masked:
            kept_z_M, flat_M, row_M = ctx.saved_tensors[5:8]
            # -p_kept(j) * scale at the kept ids of this shard; other shards' ids add exp(-inf) = 0.
            kept_grad_M = (kept_z_M - shift_N[row_M]).exp_().mul_((-scale_N / sum_N)[row_M])
            flat_grad.scatter_add_(0, flat_M, kept_grad_M)
        rows_N = torch.arange(num_rows, device=logits_NV.device)
        flat_grad.index_add_(0, rows_N * shard + target_col_N,
                             scale_N.masked_fill(~target_in_shard_N, 0.0))
        return grad_NV.to(logits_NV.dtype), None, None, None, None, None


def _real_columns(logits_NV: torch.Tensor, tp_group: ProcessGroup | None,
                  vocab_size: int | None) -> tuple[int, int]:
    """(true vocabulary size, number of real columns in this rank's shard). Megatron pads the
    vocabulary at its end (``MoEArchitecture.padded_vocab_size``), so a shard's real columns are
    a prefix of it, possibly empty."""
    rank, tp_size = _tp_rank_size(tp_group)
    shard = logits_NV.shape[1]
    padded = shard * tp_size
    if vocab_size is None:
        return padded, shard
    if not 0 < vocab_size <= padded:
        raise ValueError(f"vocab_size={vocab_size} must lie in [1, {padded}] (the logits' padded "
                         f"width {shard} x tp {tp_size})")
    return vocab_size, max(0, min(shard, vocab_size - rank * shard))


def vocab_parallel_logprobs(logits_NV: torch.Tensor, targets_N: torch.Tensor, *,
                            tp_group: ProcessGroup | None, temperature: float = 1.0,
                            kept_ids_M: torch.Tensor | None = None,
                            kept_offsets_N1: torch.Tensor | None = None,
                            check_unique: bool = True,
                            vocab_size: int | None = None) -> torch.Tensor:
    """Log-prob of each target under ``softmax(logits / temperature)``, restricted to the kept ids.

    Args:
      logits_NV: this TP rank's vocabulary shard of the logits (bf16 or fp32; computed in fp32).
      targets_N: global token ids, int64.
      tp_group: the tensor-parallel group the vocabulary is split over (None: full vocabulary).
      temperature: the rollout's sampling temperature, > 0.
      kept_ids_M, kept_offsets_N1: the keep-mask as CSR (global ids; offsets int64 [N + 1]); a
        row of length 0 means the full vocabulary. Both None: no mask anywhere.
      check_unique: reject duplicate ids within a kept row exactly (sorts the M ids). Pass False
        only for masks already validated (the rollout decoder checks the same thing).
      vocab_size: the true vocabulary when the logits carry Megatron's vocabulary padding
        (columns at or past it get no probability mass and no gradient); None: no padding.

    Returns:
      float32 [N], differentiable w.r.t. ``logits_NV`` (analytic backward on the local shard).
    """
    _check_inputs(logits_NV, temperature)
    vocab_size, valid = _real_columns(logits_NV, tp_group, vocab_size)
    _check_targets(targets_N, logits_NV.shape[0], vocab_size)
    if (kept_ids_M is None) != (kept_offsets_N1 is None):
        raise ValueError("kept_ids_M and kept_offsets_N1 must be given together")
    keep = None
    if kept_ids_M is not None:
        keep = _validate_keep_mask(kept_ids_M, kept_offsets_N1, targets_N, vocab_size=vocab_size,
                                   check_unique=check_unique)
    return _VocabParallelLogprobs.apply(logits_NV, targets_N.to(torch.int64), keep, temperature,
                                        tp_group, valid)


# Rows per chunk for the entropy's second temporary: 4M fp32 elements (16 MiB) keeps it small next
# to the [N, V] copy, and on CPU under glibc's mmap threshold, so the buffer is reused, not faulted.
_CHUNK_ELEMENTS = 1 << 22


def _row_chunks(x_NV: torch.Tensor) -> tuple[torch.Tensor, ...]:
    return x_NV.split(max(1, _CHUNK_ELEMENTS // max(1, x_NV.shape[1])))


class _VocabParallelEntropy(torch.autograd.Function):
    """``H = logsumexp(z) - sum softmax(z) * z`` per row over the full (sharded) vocabulary.

    One fp32 ``[N, V]`` copy of the logits per pass; ``exp`` is taken chunk by chunk of rows so it
    never needs a second ``[N, V]`` tensor."""

    @staticmethod
    def forward(ctx, logits_NV, temperature, tp_group, valid):
        # Only the real (unpadded) columns take part; a shard of padding only contributes zeros.
        z_NV = _scaled_fp32(logits_NV[:, :valid], temperature)
        shift_N = (z_NV.amax(dim=1) if valid else
                   torch.full(z_NV.shape[:1], float("-inf"), device=z_NV.device))
        _all_reduce(shift_N, dist.ReduceOp.MAX, tp_group)
        z_NV.sub_(shift_N.unsqueeze(1))
        # sums_2N[0] = sum exp(z - shift), sums_2N[1] = sum exp(z - shift) * (z - shift); entropy
        # is shift-invariant. One all-reduce for both.
        sums_2N = torch.empty(2, z_NV.shape[0], dtype=torch.float32, device=z_NV.device)
        row = 0
        for z_CV in _row_chunks(z_NV):
            exp_CV = z_CV.exp()
            sums_2N[0, row:row + len(z_CV)] = exp_CV.sum(dim=1)
            sums_2N[1, row:row + len(z_CV)] = exp_CV.mul_(z_CV).sum(dim=1)
            row += len(z_CV)
        del z_NV
        _all_reduce(sums_2N, dist.ReduceOp.SUM, tp_group)
        entropy_N = sums_2N[0].log() - sums_2N[1] / sums_2N[0]
        ctx.temperature = temperature
        ctx.valid = valid
        ctx.save_for_backward(logits_NV, shift_N, sums_2N[0], entropy_N)
        return entropy_N

    @staticmethod
    def backward(ctx, grad_N):
        logits_NV, shift_N, sum_N, entropy_N = ctx.saved_tensors
        # dH/dz_j = -p_j (log p_j + H) with p_j = exp(z_j - shift) / sum and
        # log p_j = (z_j - shift) - log(sum) (see the log-prob forward for why shift stays apart).
        valid = ctx.valid
        if valid == logits_NV.shape[1]:
            grad_full_NV = grad_NV = _scaled_fp32(logits_NV, ctx.temperature)
        else:  # padded columns keep a zero gradient
            grad_full_NV = torch.zeros(logits_NV.shape, dtype=torch.float32,
                                       device=logits_NV.device)
            grad_NV = grad_full_NV[:, :valid]
            grad_NV.copy_(logits_NV[:, :valid]).div_(ctx.temperature)
        grad_NV.sub_(shift_N.unsqueeze(1))
        offset_N1 = (entropy_N - sum_N.log()).unsqueeze(1)
        factor_N1 = (-(grad_N.float() / ctx.temperature) / sum_N).unsqueeze(1)
        row = 0
        for z_CV in _row_chunks(grad_NV):
            rows = slice(row, row + len(z_CV))
            exp_CV = z_CV.exp()
            z_CV.add_(offset_N1[rows]).mul_(exp_CV).mul_(factor_N1[rows])
            row += len(z_CV)
        return grad_full_NV.to(logits_NV.dtype), None, None, None


def vocab_parallel_entropy(logits_NV: torch.Tensor, *, tp_group: ProcessGroup | None,
                           temperature: float = 1.0, vocab_size: int | None = None
                           ) -> torch.Tensor:
    """Entropy of ``softmax(logits / temperature)`` over the full vocabulary, float32 [N].

    ``logits_NV`` is this TP rank's vocabulary shard (bf16 or fp32; computed in fp32);
    differentiable (``dH/dz_j = -p_j (log p_j + H)``), e.g. for an entropy bonus. ``vocab_size``:
    the true vocabulary when the logits carry Megatron's vocabulary padding (excluded).
    """
    _check_inputs(logits_NV, temperature)
    _, valid = _real_columns(logits_NV, tp_group, vocab_size)
    return _VocabParallelEntropy.apply(logits_NV, temperature, tp_group, valid)
