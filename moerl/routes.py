"""Expert routes as the trainer holds them, shared by the rollout client and the trainer.

On the wire SGLang sends int32 (``routed_experts``); once decoded and validated, routes live in
the smallest integer type that holds every expert id, all the way to the router that replays them
(Megatron's replay moves each micro-batch's ids to int64 on the model's device): 4x less host
memory and transport for models with at most 256 experts, 2x above.
"""

from __future__ import annotations

import torch


def route_dtype(num_experts: int) -> torch.dtype:
    """uint8 for at most 256 experts, int16 up to 32768, else int32."""
    if num_experts < 1:
        raise ValueError(f"num_experts must be >= 1, got {num_experts}")
    if num_experts <= 256:
        return torch.uint8
    if num_experts <= 32768:
        return torch.int16
    return torch.int32
