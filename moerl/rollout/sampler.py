"""Top-k / top-p / min-p sampling that records the sampler's support, as SGLang 0.5.23 does.

Shape-suffix legend: B rows being sampled, V vocabulary, M total kept ids over all rows.

Semantics follow SGLang's PyTorch sampler (``layers/sampler.py``,
``top_k_top_p_min_p_sampling_from_probs_torch``) and its sampling-mask capture:

- ``z = logits / temperature``; ``p = softmax(z)`` in float32. A request with temperature below
  1e-6 is greedy: SGLang rewrites it to ``top_k = 1, temperature = 1``.
- The filters are *joint*: all three thresholds are computed on the same untruncated ``p``
  (sorted descending, ties broken by token id) and intersected. Rank ``< top_k``; top-p keeps a
  token while the mass strictly before it is ``<= top_p`` (so the token that crosses ``top_p`` is
  kept); min-p keeps ``p >= min_p * max(p)``; only tokens with ``p > 0`` are support (a token
  whose probability underflows to zero cannot be sampled). SGLang's FlashInfer backend applies
  top-p after renormalising by top-k when min-p is also set; moerl always uses the joint rule.
- The sampled token's behaviour log-prob is ``z[y] - logsumexp(z[kept])``, computed as SGLang
  does, ``log(selected_weight / support_mass)`` (in float64); it is the number the trainer
  recomputes under a keep-mask.
  Greedy rows report the support ``[y]`` and log-prob exactly 0.
- The full-vocabulary log-prob is ``log_softmax(z)[y]`` (SGLang's ``output_token_logprobs``).
- Sampling is by inverse CDF on the kept, unnormalised weights with one uniform per row; the
  caller draws the uniforms from per-request generators, so a seed fixes a request's output
  independently of what it is batched with.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

GREEDY_TEMPERATURE_EPS = 1e-6  # SGLang's _SAMPLING_EPS


@dataclass(frozen=True)
class SamplingSpec:
    """Validated, SGLang-normalised sampling parameters of one request."""

    temperature: float
    top_k: int  # TOP_K_ALL for none
    top_p: float
    min_p: float
    greedy: bool
    max_new_tokens: int
    stop_token_ids: frozenset[int]
    ignore_eos: bool
    seed: int | None


@dataclass
class SamplerOutput:
    token_B: torch.Tensor  # int64 [B]
    full_logprob_B: torch.Tensor  # float32 [B], log_softmax(z)[y]
    sampling_logprob_B: torch.Tensor  # float32 [B], z[y] - logsumexp(z[kept])
    kept_ids_M: torch.Tensor  # int64 [M], each row's support in descending probability
    kept_len_B: torch.Tensor  # int64 [B]
    kept_logprobs_M: torch.Tensor | None  # float32 [M], z[i] - logsumexp(z[kept]); on request


def _sorted_candidates(p_BV: torch.Tensor, top_k_B: torch.Tensor, need_top_k: bool
                       ) -> tuple[torch.Tensor, torch.Tensor]:
    """Probabilities sorted descending with their token ids; ties in ascending token id, so the
    support and the sample do not depend on the sort implementation.

    When every row has a finite top-k, only the ``max(top_k)`` largest can be kept: select them
    with ``topk`` (as SGLang's sampler does) instead of sorting the vocabulary, then order the
    candidates stably. If some probability ties across that cutoff, ``topk`` would pick among
    the tied ids arbitrarily, so the full stable sort is used instead: the result is always the
    full sort's first ``max(top_k)`` entries.
    """
    V = p_BV.shape[-1]
    k_max = int(top_k_B.max()) if need_top_k else V
    if k_max < V:
        p_top_BK, idx_BK = torch.topk(p_BV, k_max, dim=-1, sorted=True)
        straddles = (p_BV >= p_top_BK[:, -1:]).sum(dim=-1) > k_max
        if not bool(straddles.any()):
            idx_BK = idx_BK.sort(dim=-1).values  # ascending id: the stable sort breaks ties by id
            p_sorted_BK, order_BK = torch.sort(p_BV.gather(1, idx_BK), dim=-1, descending=True,
                                               stable=True)
            return p_sorted_BK, idx_BK.gather(1, order_BK)
    return torch.sort(p_BV, dim=-1, descending=True, stable=True)


def sample_with_support(logits_BV: torch.Tensor, *, temperature_B: torch.Tensor,
                        top_k_B: torch.Tensor, top_p_B: torch.Tensor, min_p_B: torch.Tensor,
                        greedy_B: torch.Tensor, uniform_B: torch.Tensor,
                        support_logprobs: bool = True, need_top_k: bool = True,
                        need_top_p: bool = True, need_min_p: bool = True,
                        any_greedy: bool = True) -> SamplerOutput:
    """Sample one token per row and return its support and log-probs (see module docstring).

    ``top_k_B`` holds ``TOP_K_ALL`` (or anything >= V) for "no top-k"; greedy rows ignore the
    filters. ``uniform_B`` are float64 draws in [0, 1). ``support_logprobs`` also returns the
    log-prob of every kept id (SGLang's ``sampling_logprobs_mode="support"``). The ``need_*`` /
    ``any_greedy`` flags let a caller that knows no row uses a filter skip it (as SGLang's
    ``need_top_k_sampling``); leaving them True is always correct.

    Each filter keeps a prefix of the probability-sorted vocabulary, so the support is a prefix
    too; the sampled token's truncated log-prob is ``log p[y] - log(sum of kept p)``.
    """
    V = logits_BV.shape[-1]
    z_BV = logits_BV.float() / temperature_B.float().unsqueeze(1)
    logp_BV = torch.log_softmax(z_BV, dim=-1)
    p_sorted_BV, idx_sorted_BV = _sorted_candidates(logp_BV.exp(), top_k_B, need_top_k)
    V = p_sorted_BV.shape[-1]  # from here on "V" is the number of candidates kept in view
    keep_BV = p_sorted_BV > 0
    rank_V = torch.arange(V, device=logits_BV.device)
    if need_top_k:
        keep_BV &= rank_V.unsqueeze(0) < top_k_B.unsqueeze(1)
    if need_top_p:
        mass_before_BV = torch.cumsum(p_sorted_BV, dim=-1) - p_sorted_BV
        keep_BV &= mass_before_BV <= top_p_B.float().unsqueeze(1)
    if need_min_p:
        keep_BV &= p_sorted_BV >= p_sorted_BV[:, :1] * min_p_B.float().unsqueeze(1)
    if any_greedy:
        keep_BV[greedy_B] = rank_V == 0
    kept_len_B = keep_BV.sum(dim=-1)

    cdf_BV = torch.cumsum(p_sorted_BV.double() * keep_BV, dim=-1)
    total_B = cdf_BV[:, -1]
    pick_B = torch.searchsorted(cdf_BV, (uniform_B.double() * total_B).unsqueeze(1),
                                right=True).squeeze(1)
    # Float rounding can put the target on the last kept step; never step past the support.
    pick_B = torch.minimum(pick_B, kept_len_B - 1)
    token_B = idx_sorted_BV.gather(1, pick_B.unsqueeze(1)).squeeze(1)
    full_logprob_B = logp_BV.gather(1, token_B.unsqueeze(1)).squeeze(1)
    log_total_B = total_B.log()
    sampling_logprob_B = (full_logprob_B.double() - log_total_B).float()
    if any_greedy:
        sampling_logprob_B[greedy_B] = 0.0
    kept_logprobs_M = None
    if support_logprobs:
        kept_BV = logp_BV.gather(1, idx_sorted_BV).double() - log_total_B.unsqueeze(1)
        kept_BV[greedy_B, 0] = 0.0
        kept_logprobs_M = kept_BV.float()[keep_BV]
    return SamplerOutput(token_B=token_B, full_logprob_B=full_logprob_B,
                         sampling_logprob_B=sampling_logprob_B,
                         kept_ids_M=idx_sorted_BV[keep_BV], kept_len_B=kept_len_B,
                         kept_logprobs_M=kept_logprobs_M)
