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
    # Expert ids per (position, hidden layer, k), [P+R-1, L_all, K] in the smallest integer type
    # holding the expert count (moerl.routes.route_dtype), SGLang's layout otherwise: the
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
    # bool [R]: which response tokens the policy sampled (a custom multi-turn rollout's
    # environment tokens are False: in the sequence, out of the loss). None: all of them.
    loss_mask_R: torch.Tensor | None = None

    @property
    def num_response_tokens(self) -> int:
        return len(self.response_ids)


# Fields of RolloutBatch that hold one value per sample / per token position, for select().
_PER_SAMPLE = ("group_ids_B", "rewards_B", "truncated_B", "prompt_lengths_B", "response_lengths_B",
               "scores_B")
_PER_TOKEN = ("tokens_BT", "targets_BT", "response_mask_BT", "rollout_logprobs_BT",
              "ref_logprobs_BT", "old_logprobs_BT", "values_BT", "advantages_BT", "returns_BT",
              "token_rewards_BT", "rollout_is_weights_BT")
_PER_TOKEN_EXTRA = ("routes_BTLK", "trainer_routes_BTLK")  # [B, T, L_moe, K]


@dataclass
class RolloutBatch:
    """The trainer's batch: right-padded ``[B, T]`` tensors, every per-token tensor aligned on the
    position that *predicts* the token, i.e. column t refers to ``targets_BT[:, t] =
    tokens_BT[:, t + 1]`` (the model's logits at position t). ``T`` is a multiple of the
    tensor-parallel size (sequence parallelism splits it).

    Stages fill the optional fields in order: rollout -> rewards -> ref/old log-probs -> values ->
    advantages. OpenRLHF-style: one typed batch between stages, never free-form dicts.
    """

    # -- tokens (from the rollout)
    tokens_BT: torch.Tensor  # int64, prompt + response, right-padded with pad_id
    targets_BT: torch.Tensor  # int64, tokens shifted left by one (pad at the end)
    response_mask_BT: torch.Tensor  # bool, column t counts iff targets_BT[:, t] is a response token
    prompt_lengths_B: torch.Tensor  # int64
    response_lengths_B: torch.Tensor  # int64
    # -- what the rollout engine did
    rollout_logprobs_BT: torch.Tensor  # float32, behaviour log-probs (0 outside the mask)
    truncated_B: torch.Tensor  # bool, finish_reason == "length"
    # The heavy per-token data cover the rows in heavy_rows_b only, in that order ([b, ...] with
    # b = len(heavy_rows_b)); every row when it is None. A data-parallel rank holds those of the
    # rows it owns (moerl.batch_transport); select() maps rows to them.
    routes_BTLK: torch.Tensor | None = None  # route_dtype rollout routes, MoE layers, pads distinct
    kept_ids_M: torch.Tensor | None = None  # int64 CSR of kept ids over b*T positions, row-major
    kept_offsets_N1: torch.Tensor | None = None  # int64 [b*T + 1]; empty row = full vocabulary
    heavy_rows_b: torch.Tensor | None = None  # int64, rows of the heavy fields; None = all
    # -- rewards
    group_ids_B: torch.Tensor | None = None  # int64, samples of one prompt share an id
    scores_B: torch.Tensor | None = None  # float32, the verifier's score (accuracy)
    rewards_B: torch.Tensor | None = None  # float32, score + shaping (overlong punishment)
    # -- filled by the trainer
    ref_logprobs_BT: torch.Tensor | None = None
    old_logprobs_BT: torch.Tensor | None = None
    trainer_routes_BTLK: torch.Tensor | None = None  # heavy: routes recorded in the old pass
    values_BT: torch.Tensor | None = None
    token_rewards_BT: torch.Tensor | None = None
    advantages_BT: torch.Tensor | None = None
    returns_BT: torch.Tensor | None = None
    rollout_is_weights_BT: torch.Tensor | None = None  # float32, rollout correction (detached)

    @property
    def batch_size(self) -> int:
        return self.tokens_BT.shape[0]

    @property
    def seq_len(self) -> int:
        return self.tokens_BT.shape[1]

    def select(self, rows: torch.Tensor | list[int], *, pad_multiple: int = 1) -> "RolloutBatch":
        """The sub-batch of ``rows``, trimmed to its longest sequence rounded up to a multiple of
        ``pad_multiple`` (so a micro-batch of short samples does not pay for the longest)."""
        rows = torch.as_tensor(rows, dtype=torch.long)
        used = int((self.prompt_lengths_B[rows] + self.response_lengths_B[rows]).max())
        width = min(self.seq_len, -(-used // pad_multiple) * pad_multiple)
        out = {}
        for name in _PER_SAMPLE:
            value = getattr(self, name)
            out[name] = None if value is None else value[rows]
        for name in _PER_TOKEN:
            value = getattr(self, name)
            out[name] = None if value is None else value[rows, :width].contiguous()
        heavy = self.heavy_index(rows)
        for name in _PER_TOKEN_EXTRA:
            value = getattr(self, name)
            out[name] = None if value is None else value[heavy, :width].contiguous()
        if width > self.seq_len:  # pad_multiple larger than the batch's own padding
            raise ValueError(f"batch width {self.seq_len} is not a multiple of {pad_multiple}")
        out["kept_ids_M"], out["kept_offsets_N1"] = None, None
        if self.kept_offsets_N1 is not None:
            out["kept_ids_M"], out["kept_offsets_N1"] = _select_csr(
                self.kept_ids_M, self.kept_offsets_N1, heavy, self.seq_len, width)
        return RolloutBatch(**out)

    def heavy_index(self, rows: torch.Tensor) -> torch.Tensor:
        """Positions of ``rows`` in the heavy fields (see ``heavy_rows_b``)."""
        rows = torch.as_tensor(rows, dtype=torch.long)
        if self.heavy_rows_b is None:
            return rows
        index_B = torch.full((self.batch_size,), -1, dtype=torch.long)
        index_B[self.heavy_rows_b] = torch.arange(len(self.heavy_rows_b))
        local = index_B[rows]
        assert bool((local >= 0).all()), "rows outside this rank's share of the routes and masks"
        return local

    @property
    def num_heavy_rows(self) -> int:
        return self.batch_size if self.heavy_rows_b is None else len(self.heavy_rows_b)

    def tensors(self) -> dict[str, torch.Tensor]:
        """Every non-None field, for broadcasting and checkpointing."""
        return {f: v for f, v in vars(self).items() if isinstance(v, torch.Tensor)}

    def to(self, device: torch.device | str) -> "RolloutBatch":
        """A copy with every tensor on ``device`` (a micro-batch on its way to the model)."""
        return RolloutBatch(**{f: v.to(device, non_blocking=True) if isinstance(v, torch.Tensor)
                               else v for f, v in vars(self).items()})


def _select_csr(ids_M, offsets_N1, rows_b, seq_len: int, width: int):
    """Rows ``rows_b`` (first ``width`` columns) of a CSR laid out over ``[B, seq_len]``."""
    starts_bt = offsets_N1[:-1].view(-1, seq_len)[rows_b, :width]
    ends_bt = offsets_N1[1:].view(-1, seq_len)[rows_b, :width]
    lengths_n = (ends_bt - starts_bt).reshape(-1)
    new_offsets = torch.zeros(lengths_n.numel() + 1, dtype=torch.long)
    torch.cumsum(lengths_n, 0, out=new_offsets[1:])
    # Index of every kept id in the source: its row's start plus its position within the row.
    row_of_m = torch.repeat_interleave(torch.arange(lengths_n.numel()), lengths_n)
    within_m = torch.arange(int(new_offsets[-1])) - new_offsets[:-1][row_of_m]
    return ids_M[starts_bt.reshape(-1)[row_of_m] + within_m], new_offsets


def pack_samples(samples: list[Sample], *, pad_id: int, pad_multiple: int = 1,
                 arch=None) -> RolloutBatch:
    """Right-pad samples into a :class:`RolloutBatch` (T rounded up to ``pad_multiple``).

    Sampling masks become one CSR over all ``B*T`` positions (rows outside responses empty).
    Rollout routes (when the samples carry them and ``arch``, a ``MoEArchitecture``, is given)
    keep only the MoE layers and get replayable padding rows
    (:func:`moerl.trainer.routing_replay.pack_routes_BTLK`).
    """
    if not samples:
        raise ValueError("pack_samples needs at least one sample")
    lengths = [len(s.prompt_ids) + len(s.response_ids) for s in samples]
    width = -(-max(lengths) // pad_multiple) * pad_multiple
    num = len(samples)
    tokens = torch.full((num, width), pad_id, dtype=torch.long)
    targets = torch.full((num, width), pad_id, dtype=torch.long)
    mask = torch.zeros((num, width), dtype=torch.bool)
    rollout_lp = torch.zeros((num, width), dtype=torch.float32)
    for b, s in enumerate(samples):
        seq = torch.tensor(s.prompt_ids + s.response_ids, dtype=torch.long)
        p, r = len(s.prompt_ids), len(s.response_ids)
        tokens[b, : p + r] = seq
        targets[b, : p + r - 1] = seq[1:]
        mask[b, p - 1 : p + r - 1] = True if s.loss_mask_R is None else s.loss_mask_R.bool()
        rollout_lp[b, p - 1 : p + r - 1] = s.rollout_logprobs_R.float()
    batch = RolloutBatch(
        tokens_BT=tokens, targets_BT=targets, response_mask_BT=mask,
        prompt_lengths_B=torch.tensor([len(s.prompt_ids) for s in samples]),
        response_lengths_B=torch.tensor([len(s.response_ids) for s in samples]),
        rollout_logprobs_BT=rollout_lp,
        truncated_B=torch.tensor([s.finish_reason == "length" for s in samples]),
        group_ids_B=torch.tensor([s.group_index for s in samples]),
        scores_B=None if samples[0].reward is None else torch.tensor(
            [float(s.reward) for s in samples]),
    )
    has_mask = [s.mask_offsets_R1 is not None for s in samples]
    if any(has_mask):
        if not all(has_mask):
            raise ValueError("some samples carry a sampling mask and some do not")
        batch.kept_ids_M, batch.kept_offsets_N1 = _pack_csr(samples, width)
    if arch is not None and any(s.routes_TLK is not None for s in samples):
        from moerl.trainer.routing_replay import pack_routes_BTLK

        batch.routes_BTLK = pack_routes_BTLK([s.routes_TLK for s in samples], seq_len=width,
                                             arch=arch)
    return batch


def _pack_csr(samples: list[Sample], width: int) -> tuple[torch.Tensor, torch.Tensor]:
    lengths = torch.zeros(len(samples), width, dtype=torch.long)
    for b, s in enumerate(samples):
        p, r = len(s.prompt_ids), len(s.response_ids)
        lengths[b, p - 1 : p - 1 + r] = s.mask_offsets_R1[1:] - s.mask_offsets_R1[:-1]
    offsets = torch.zeros(lengths.numel() + 1, dtype=torch.long)
    torch.cumsum(lengths.reshape(-1), 0, out=offsets[1:])
    ids = torch.cat([s.mask_ids_M.long() for s in samples])
    return ids, offsets


def broadcast_json(value, *, src: int, group=None):
    """Rank ``src``'s JSON-serialisable ``value`` on every rank of ``group`` (bytes, no pickle)."""
    import json

    import torch.distributed as dist

    mine = dist.get_rank() == src
    raw = json.dumps(value).encode() if mine else b""
    size = torch.tensor([len(raw)], dtype=torch.long)
    dist.broadcast(size, src, group=group)
    buf = (torch.frombuffer(bytearray(raw), dtype=torch.uint8) if mine
           else torch.empty(int(size), dtype=torch.uint8))
    dist.broadcast(buf, src, group=group)
    return value if mine else json.loads(bytes(buf.tolist()).decode())


def broadcast_batch(batch: RolloutBatch | None, *, src: int, group=None) -> RolloutBatch:
    """Send rank ``src``'s batch to every rank of ``group`` (tensors + a JSON header, no pickle)."""
    import torch.distributed as dist

    mine = dist.get_rank() == src
    tensors = batch.tensors() if mine else {}
    spec = broadcast_json({k: [str(v.dtype).removeprefix("torch."), list(v.shape)]
                           for k, v in tensors.items()}, src=src, group=group)
    out = {}
    for name, (dtype, shape) in spec.items():
        t = tensors[name].contiguous() if mine else torch.empty(shape, dtype=getattr(torch, dtype))
        dist.broadcast(t, src, group=group)
        out[name] = t
    return batch if mine else RolloutBatch(**out)
