"""Masked reductions and group bookkeeping shared by the algorithm modules.

Shape-suffix legend:
  B  samples in a batch      T  padded per-token length (column t = the token predicted at t)
  G  prompt groups

Every per-token input may hold garbage (NaN, +-inf) where the mask is 0. The functions here select
with ``torch.where`` *before* any arithmetic, so garbage reaches neither the outputs nor, through
``0 * inf``, the gradients.
"""

from __future__ import annotations

import torch


def bool_mask(mask_BT: torch.Tensor, **tensors_BT: torch.Tensor) -> torch.Tensor:
    """Check that ``mask_BT`` is 2-D and every named tensor has its shape; return it as bool.

    The mask is binary (1 = a response token that counts); a float mask is read as ``!= 0``.
    """
    if mask_BT.dim() != 2:
        raise ValueError(f"mask_BT must be 2-D [B, T], got shape {tuple(mask_BT.shape)}")
    for name, t in tensors_BT.items():
        if t.shape != mask_BT.shape:
            raise ValueError(
                f"{name} has shape {tuple(t.shape)}, expected the mask's {tuple(mask_BT.shape)}"
            )
    return mask_BT.bool()


def check_per_sample(mask_BT: torch.Tensor, **tensors_B: torch.Tensor) -> None:
    """Check that every named tensor is 1-D with one entry per row of ``mask_BT``."""
    for name, t in tensors_B.items():
        if t.shape != mask_BT.shape[:1]:
            raise ValueError(f"{name} has shape {tuple(t.shape)}, expected [{mask_BT.shape[0]}]")


def zero_masked(x_BT: torch.Tensor, mask_BT: torch.Tensor) -> torch.Tensor:
    """``x`` where the (bool) mask is set, exactly 0 elsewhere (gradient 0 there too)."""
    return torch.where(mask_BT, x_BT, torch.zeros((), dtype=x_BT.dtype, device=x_BT.device))


def masked_mean(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean of ``x`` over the set entries of the bool ``mask`` (any shape); 0 when none are set."""
    total = zero_masked(x, mask).sum()
    return total / mask.sum().clamp(min=1).to(total.dtype)


def seq_mean(x_BT: torch.Tensor, mask_BT: torch.Tensor) -> torch.Tensor:
    """Per-row masked mean ``[B]``; rows without a set entry give 0."""
    total_B = zero_masked(x_BT, mask_BT).sum(-1)
    return total_B / mask_BT.sum(-1).clamp(min=1).to(total_B.dtype)


def nonempty_rows(mask_BT: torch.Tensor) -> torch.Tensor:
    """Bool ``[B]``: rows with at least one counted token (empty rows are padding rows)."""
    return mask_BT.any(-1)


def group_inverse(group_ids_B: torch.Tensor) -> tuple[torch.Tensor, int]:
    """Map arbitrary group labels to ``0..G-1``; returns (index per sample ``[B]``, G).

    ``torch.unique`` syncs with the host on CUDA; advantages and filters run once per rollout
    batch, not per micro-batch, so the sync is not on the training hot path.
    """
    if group_ids_B.dim() != 1:
        raise ValueError(f"group_ids_B must be 1-D [B], got shape {tuple(group_ids_B.shape)}")
    if group_ids_B.is_floating_point():
        raise ValueError("group_ids_B must be an integer tensor of group labels")
    labels_G, inverse_B = torch.unique(group_ids_B, return_inverse=True)
    return inverse_B, labels_G.numel()


def group_sum(x_B: torch.Tensor, inverse_B: torch.Tensor, num_groups: int) -> torch.Tensor:
    """Sum of ``x`` over each group ``[G]``."""
    return torch.zeros(num_groups, dtype=x_B.dtype, device=x_B.device).index_add_(0, inverse_B, x_B)
