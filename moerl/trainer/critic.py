"""PPO's critic: a Megatron MoE model with a scalar value head in place of the LM head.

Initialised from the actor's (or ``model.critic_path``'s) HF checkpoint; the value head starts at
zero so the first values are 0 and GAE starts as Monte-Carlo returns. Built without routing
replay (``RouterReplay`` instances are process-global and belong to the actor); the critic routes
naturally in every pass.

Under sequence parallelism the final hidden states are sharded along the sequence; the head is
replicated, applied to the local shard and the values gathered. Its weight therefore sees
different tokens on each tensor-parallel rank and is marked ``sequence_parallel`` so that
``finalize_model_grads`` sums its gradient over the TP group, as for the norms.

Shape legend: B samples, T padded length, S local sequence shard, H hidden.
"""

from __future__ import annotations

from pathlib import Path

import torch

from moerl.algos import AGGREGATIONS, clipped_value_loss
from moerl.batch import RolloutBatch
from moerl.trainer.hf_bridge import load_hf_weights
from moerl.trainer.model import MoEArchitecture, build_gpt_model
from moerl.trainer.optimizer import build_optimizer
from moerl.trainer.parallel import ParallelLayout, ProcessGroups


class ValueHead(torch.nn.Module):
    """Stands in for GPTModel's ``output_layer``: ``[S, B, H] -> ([T, B, 1], None)``."""

    def __init__(self, hidden_size: int, *, sequence_parallel: bool):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.zeros(1, hidden_size))
        self.sequence_parallel = sequence_parallel
        if sequence_parallel:
            self.weight.sequence_parallel = True

    def forward(self, hidden_SBH: torch.Tensor, weight=None, runtime_gather_output=None):
        values_SB1 = torch.nn.functional.linear(hidden_SBH.float(), self.weight.float())
        if self.sequence_parallel:
            from megatron.core.tensor_parallel import gather_from_sequence_parallel_region

            # Every TP rank computes the same loss on the gathered values, so the backward of the
            # gather must split (not sum) the gradient.
            values_SB1 = gather_from_sequence_parallel_region(values_SB1,
                                                              tensor_parallel_output_grad=False)
        return values_SB1, None


class Critic:
    def __init__(self, *, arch: MoEArchitecture, layout: ParallelLayout, groups: ProcessGroups,
                 hf_path: str, bf16: bool, token_dispatcher: str | None,
                 optim: dict, value_clip: float, fp16: bool = False):
        self.layout, self.value_clip = layout, value_clip
        model = build_gpt_model(arch, layout, bf16=bf16, fp16=fp16,
                                token_dispatcher=token_dispatcher,
                                routing_replay=False)
        load_hf_weights(model, hf_path, arch, layout)
        model.output_layer = ValueHead(arch.hidden_size, sequence_parallel=layout.sp)
        self.optimizer = build_optimizer(model, layout, groups, **optim)
        self.model = self.optimizer.model
        self.device = next(model.parameters()).device

    def _values(self, mb: RolloutBatch) -> torch.Tensor:
        b, t = mb.tokens_BT.shape
        positions = torch.arange(t, device=mb.tokens_BT.device).expand(b, t)
        return self.model(mb.tokens_BT, positions, None).view(b, t).float()

    @torch.no_grad()
    def compute_values(self, batch: RolloutBatch, rows: torch.Tensor, *,
                       micro_batch_size: int) -> None:
        self.model.eval()
        if batch.values_BT is None:
            batch.values_BT = torch.zeros(batch.tokens_BT.shape)
        for start in range(0, len(rows), micro_batch_size):
            mb_rows = rows[start:start + micro_batch_size]
            mb = batch.select(mb_rows, pad_multiple=self.layout.tp).to(self.device)
            batch.values_BT[mb_rows, :mb.seq_len] = self._values(mb).cpu()

    def train_step(self, batch: RolloutBatch, rows: torch.Tensor, *, tokens: torch.Tensor,
                   micro_batch_size: int) -> dict[str, float]:
        """One clipped-value-loss step on ``rows`` (token-mean over the mini-batch's tokens)."""
        self.model.train()
        self.optimizer.zero_grad()
        total, clipfrac, count = 0.0, 0.0, 0
        for start in range(0, len(rows), micro_batch_size):
            mb = batch.select(rows[start:start + micro_batch_size],
                              pad_multiple=self.layout.tp).to(self.device)
            loss_BT, metrics = clipped_value_loss(self._values(mb), mb.values_BT, mb.returns_BT,
                                                  mb.response_mask_BT, clip_eps=self.value_clip)
            loss = AGGREGATIONS["token_mean"](loss_BT, mb.response_mask_BT,
                                              global_num_tokens=tokens)
            self.optimizer.scale_loss(loss).backward()
            total += loss.item()
            clipfrac += metrics["vf_clipfrac"].item()
            count += 1
        result = self.optimizer.step()
        return {"critic/loss": total, "critic/vf_clipfrac": clipfrac / max(count, 1),
                "critic/grad_norm": result.grad_norm}

    def save(self, path) -> Path:
        return self.optimizer.save(path)

    def load(self, path) -> None:
        self.optimizer.load(path)
