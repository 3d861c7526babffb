"""The typed records that flow between moerl's stages.

Shape-suffix legend (used in names throughout moerl):
  B  samples in a batch            T  padded sequence length (prompt + response)
  P  prompt length                 R  response length (generated tokens)
  L  hidden layers (all, as on the wire) or MoE layers (once dense layers are dropped)
  K  experts per token (top-k)     M  total kept-token ids in a CSR sampling mask
  V  vocabulary (or one tensor-parallel shard of it)

Log-prob vocabulary (STYLE rule 4): ``logprobs`` current policy (with grad), ``old_logprobs``
trainer recompute of pi_old, ``rollout_logprobs`` what the rollout engine sampled with,
``ref_logprobs`` reference policy.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch


@dataclass
class Sample:
    """One generated response: one member of a prompt's group of ``n`` samples.

    Produced by the rollout client from a ``/generate`` response (SGLang-compatible wire format,
    see ``moerl.rollout.protocol``); rewards are filled in by the task's verifier.
    """

    group_index: int  # index of the prompt in the rollout batch
    sample_index: int  # index within the prompt's group, 0..n-1
    prompt_ids: list[int]
    response_ids: list[int]
    # Behaviour log-probs of the sampled tokens, float32 [R]: under the sampler's truncated,
    # renormalised distribution when the server returned a sampling mask
    # (``output_token_sampling_logprobs``), else the full-vocabulary log-probs. Importance ratios
    # against the rollout use these.
    rollout_logprobs_R: torch.Tensor
    # Full-vocabulary log-probs of the sampled tokens, float32 [R] (``output_token_logprobs``).
    full_logprobs_R: torch.Tensor
    finish_reason: str  # "stop" | "length" | "abort"
    weight_version: str = ""
    # Expert ids per (position, hidden layer, k), int32 [P+R-1, L_all, K], SGLang's layout: the
    # final token never went through the model; dense layers are rows of zeros. None when routes
    # were not requested.
    routes_TLK: torch.Tensor | None = None
    # Sampler support per generated token as CSR: ids int32 [M], offsets int64 [R+1]. A row of
    # length 0 means "sampled from the full vocabulary" (no truncation at that position). The
    # sampled token is always in its row. None when masks were not requested.
    mask_ids_M: torch.Tensor | None = None
    mask_offsets_R1: torch.Tensor | None = None
    reward: float | None = None
    extra: dict = field(default_factory=dict)  # task metadata (e.g. the reference answer)

    @property
    def num_response_tokens(self) -> int:
        return len(self.response_ids)
