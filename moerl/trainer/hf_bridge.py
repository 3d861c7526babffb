"""Hugging Face safetensors <-> sharded Megatron parameters, for any TP/EP/ETP layout.

Loading reads, on every rank, only the slices of the HF tensors that this rank's parameters hold
(``safe_open(...).get_slice``), so a large checkpoint never loads whole on one process. Exporting
walks the model one HF tensor at a time, gathering the shards with collectives, so the peak extra
memory is one full tensor; the same iterator feeds ``save_hf_checkpoint`` and the weight sync to
the rollout server, so its order and names are part of the contract: :func:`hf_tensor_shapes`
lists them, in export order.

The mapping is the family's list of *units* (``moerl.families``), one per logical Megatron tensor (experts counted by global
id), each naming its HF tensors and how Megatron lays them out:

- ``none``: replicated on every TP rank (norms, QK-norms, router).
- ``rows`` / ``cols``: the full tensor split into equal contiguous blocks along dim 0 / dim 1
  (``linear_proj`` and ``linear_fc2``).
- ``vocab``: the vocab-parallel embedding and output layer: ``rows`` of the tensor zero-padded to
  ``arch.padded_vocab_size(tp)`` rows (Megatron's convention); loading writes zeros into the
  padded rows, exporting strips them, so the HF round trip stays bit-identical.
- ``qkv``: Megatron's fused QKV weight stores, per query group ``g``, the rows of the group's
  ``num_heads / num_kv_heads`` query heads, then its key head, then its value head; TP splits the
  groups into contiguous blocks.
- ``glu``: each shard of ``linear_fc1`` is ``[gate_shard; up_shard]`` (TP for dense MLPs, expert
  TP for experts), so the unsharded Megatron tensor is *not* ``[gate; up]`` when sharded.

Expert ``e`` of a layer lives on EP rank ``e // (num_experts / ep)`` as local expert
``e % (num_experts / ep)``, under ``experts.local_experts.{j}.linear_fc1.weight`` (local spec) or
``experts.linear_fc1.weight{j}`` (Transformer Engine grouped GEMM). Transformer Engine also fuses
the pre-attention norm into ``linear_qkv.layer_norm_weight`` and a dense layer's pre-MLP norm into
``linear_fc1.layer_norm_weight``; both spellings map to the same HF tensors.

Tied embeddings (``tie_word_embeddings``): transformers does not write ``lm_head.weight``; the
export does not either, and loading ignores an ``lm_head.weight`` present on disk.

Shape legend: ``G`` query groups (KV heads) in the tensor, ``R`` rows of one group in the fused
QKV weight (``(num_heads / num_kv_heads + 2) * head_dim``), ``H`` hidden size.
"""

from __future__ import annotations

import contextlib
import json
import logging
import re
from collections.abc import Iterator
from pathlib import Path

import torch
import torch.distributed as dist

from moerl.families import MoEArchitecture, Unit, family_of
from moerl.hf_io import INDEX_FILE, SINGLE_FILE, write_hf_checkpoint
from moerl.trainer.parallel import ParallelLayout, ProcessGroups

_MAX_LISTED = 12  # names listed per category in an error message
_log = logging.getLogger(__name__)


def _units(arch: MoEArchitecture) -> list[Unit]:
    """All units of the model, in export order (the family's tensor map)."""
    return family_of(arch).units(arch)


def hf_tensor_shapes(arch: MoEArchitecture) -> dict[str, tuple[int, ...]]:
    """Every HF tensor the model consists of, with its full shape, in export order."""
    return {name: shape for unit in _units(arch) for name, shape in unit.hf}


# Megatron spellings that name the same unit as the canonical (local-spec) name.
_TE_FUSED_NORMS = (
    (re.compile(r"^(decoder\.layers\.\d+)\.self_attention\.linear_qkv\.layer_norm_weight$"),
     r"\1.input_layernorm.weight"),
    (re.compile(r"^(decoder\.layers\.\d+\.self_attention)\.linear_q_up_proj\.layer_norm_weight$"),
     r"\1.q_layernorm.weight"),
    (re.compile(r"^(decoder\.layers\.\d+\.self_attention)\.linear_kv_up_proj\.layer_norm_weight$"),
     r"\1.kv_layernorm.weight"),
    (re.compile(r"^(decoder\.layers\.\d+)\.mlp\.linear_fc1\.layer_norm_weight$"),
     r"\1.pre_mlp_layernorm.weight"),
)
_LOCAL_EXPERT = re.compile(
    r"^(decoder\.layers\.\d+\.mlp\.experts)\.local_experts\.(\d+)\.(linear_fc[12])\.weight$")
_GROUPED_EXPERT = re.compile(
    r"^(decoder\.layers\.\d+\.mlp\.experts)\.(linear_fc[12])\.weight(\d+)$")


def _canonical_key(name: str, *, experts_per_rank: int, ep_rank: int) -> str:
    """This rank's Megatron parameter name -> the unit key (experts renumbered to global ids)."""
    for pattern, repl in _TE_FUSED_NORMS:
        if pattern.match(name):
            return pattern.sub(repl, name)
    if m := _LOCAL_EXPERT.match(name):
        prefix, local, proj = m.group(1), int(m.group(2)), m.group(3)
    elif m := _GROUPED_EXPERT.match(name):
        prefix, proj, local = m.group(1), m.group(2), int(m.group(3))
    else:
        return name
    return f"{prefix}.{ep_rank * experts_per_rank + local}.{proj}.weight"


def _unwrap(model: torch.nn.Module) -> torch.nn.Module:
    """The GPTModel inside DDP / Float16Module wrappers (they keep it as ``.module``)."""
    while hasattr(model, "module") and isinstance(model.module, torch.nn.Module):
        model = model.module
    return model


def _local_params(model: torch.nn.Module, arch: MoEArchitecture,
                  layout: ParallelLayout) -> dict[str, torch.nn.Parameter]:
    """Unit key -> this rank's parameter (or mapped buffer, e.g. the router's expert bias);
    ValueError if the model and ``arch`` disagree."""
    experts_per_rank = arch.num_experts // layout.ep
    units = _units(arch)
    buffer_keys = {u.key for u in units if u.buffer}
    local = {}
    module = _unwrap(model)
    named = [*module.named_parameters(),
             *((name, b) for name, b in module.named_buffers() if name in buffer_keys)]
    for name, param in named:
        key = _canonical_key(name, experts_per_rank=experts_per_rank, ep_rank=layout.ep_rank)
        if key in local:
            raise ValueError(f"two Megatron parameters map to {key!r}")
        local[key] = param
    owned = {u.key for u in units
             if u.expert is None or u.expert // experts_per_rank == layout.ep_rank}
    missing, unexpected = sorted(owned - local.keys()), sorted(local.keys() - owned)
    if missing or unexpected:
        raise ValueError("the Megatron model does not match the architecture: "
                         + _describe(missing=missing, unexpected=unexpected))
    return local


def _describe(**named_lists: list[str]) -> str:
    parts = []
    for label, names in named_lists.items():
        if names:
            more = f" (+{len(names) - _MAX_LISTED} more)" if len(names) > _MAX_LISTED else ""
            parts.append(f"{label} ({len(names)}): {', '.join(names[:_MAX_LISTED])}{more}")
    return "; ".join(parts)


def _replicated(unit: Unit, local: torch.Tensor) -> bool:
    """Whether this rank holds ``unit`` whole: ``none``, or an MLA ``down`` projection that
    Transformer Engine duplicates (the local spec splits it by rows)."""
    return unit.split == "none" or (unit.split == "down" and local.shape[0] == unit.hf[0][1][0])


def _shard_coords(unit: Unit, layout: ParallelLayout, local: torch.Tensor) -> tuple[int, int]:
    """(shard index, number of shards) of this rank's piece of ``unit``."""
    if _replicated(unit, local):
        return 0, 1
    if unit.expert is not None:
        return _expert_tp(layout)[0], layout.etp
    return layout.tp_rank, layout.tp


def _expert_tp(layout: ParallelLayout) -> tuple[int, dist.ProcessGroup | None]:
    """This rank's expert-tensor-parallel rank and group (ParallelLayout/ProcessGroups lack
    them; with etp == 1 they are trivial)."""
    if layout.etp == 1:
        return 0, None
    from megatron.core import parallel_state as ps

    return ps.get_expert_tensor_parallel_rank(), ps.get_expert_tensor_parallel_group()


class _Checkpoint:
    """Lazy reader of an HF safetensors checkpoint (single file or index + shards)."""

    def __init__(self, hf_dir: Path, stack: contextlib.ExitStack) -> None:
        from safetensors import safe_open

        index = hf_dir / INDEX_FILE
        if index.exists():
            weight_map = json.loads(index.read_text())["weight_map"]
        elif (hf_dir / SINGLE_FILE).exists():
            with safe_open(hf_dir / SINGLE_FILE, framework="pt") as f:
                weight_map = {name: SINGLE_FILE for name in f.keys()}
        else:
            raise ValueError(f"{hf_dir} has neither {SINGLE_FILE} nor {INDEX_FILE}")
        self.files = {name: hf_dir / file for name, file in weight_map.items()}
        self._handles = {file: stack.enter_context(safe_open(file, framework="pt"))
                         for file in sorted(set(self.files.values()))}

    def slice(self, name: str):
        return self._handles[self.files[name]].get_slice(name)

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self.slice(name).get_shape())


def _read_shard(ckpt: _Checkpoint, unit: Unit, arch: MoEArchitecture, shard: int,
                num_shards: int) -> torch.Tensor:
    """This rank's piece of ``unit`` in Megatron's layout, read slice by slice."""
    if unit.split == "none":
        return ckpt.slice(unit.hf_names[0])[:]

    def rows(name: str) -> torch.Tensor:
        n = ckpt.shape(name)[0] // num_shards
        return ckpt.slice(name)[shard * n:(shard + 1) * n]

    if unit.split in ("rows", "down"):
        return rows(unit.hf_names[0])
    if unit.split == "vocab":
        return _vocab_rows(ckpt, unit.hf_names[0], arch, shard, num_shards)
    if unit.split == "cols":
        n = ckpt.shape(unit.hf_names[0])[1] // num_shards
        return ckpt.slice(unit.hf_names[0])[:, shard * n:(shard + 1) * n]
    if unit.split == "glu":
        return torch.cat([rows(name) for name in unit.hf_names])
    assert unit.split == "qkv", unit.split
    groups = arch.num_kv_heads // num_shards  # contiguous block of query groups of this shard
    q_k_v = [rows(name) for name in unit.hf_names]
    rest = q_k_v[0].shape[1:]  # (H,) for the weight, () for the bias
    qkv_GRH = torch.cat([t.reshape(groups, -1, *rest) for t in q_k_v], dim=1)
    return qkv_GRH.reshape(-1, *rest)


def _vocab_rows(ckpt: _Checkpoint, name: str, arch: MoEArchitecture, shard: int,
                num_shards: int) -> torch.Tensor:
    """Rows ``[shard * n, (shard + 1) * n)`` of the vocabulary padded to
    ``padded_vocab_size(num_shards)``: real rows from the file, zeros past ``vocab_size``."""
    n = arch.padded_vocab_size(num_shards) // num_shards
    start, stop = shard * n, min((shard + 1) * n, arch.vocab_size)
    real = ckpt.slice(name)[start:stop] if stop > start else None
    out = torch.zeros((n, *ckpt.shape(name)[1:]),
                      dtype=real.dtype if real is not None else torch.float32)
    if real is not None:
        out[:stop - start] = real
    return out


def _merge_shards(unit: Unit, shards: list[torch.Tensor],
                  arch: MoEArchitecture) -> list[tuple[str, torch.Tensor]]:
    """Inverse of :func:`_read_shard`: all shards of ``unit`` -> its full HF tensors."""
    if unit.split == "none":
        return [(unit.hf_names[0], shards[0])]
    if unit.split in ("rows", "cols", "down"):
        return [(unit.hf_names[0], torch.cat(shards, dim=1 if unit.split == "cols" else 0))]
    if unit.split == "vocab":  # strip Megatron's vocabulary padding
        return [(unit.hf_names[0], torch.cat(shards)[:arch.vocab_size])]
    if unit.split == "glu":
        halves = [shard.chunk(2, dim=0) for shard in shards]
        return [(name, torch.cat([h[i] for h in halves])) for i, name in enumerate(unit.hf_names)]
    assert unit.split == "qkv", unit.split
    heads_per_group = arch.num_heads // arch.num_kv_heads
    d = arch.head_dim
    rest = shards[0].shape[1:]  # (H,) for the weight, () for the bias
    qkv_GRH = torch.cat(shards).reshape(arch.num_kv_heads, (heads_per_group + 2) * d, *rest)
    q, k, v = qkv_GRH.split([heads_per_group * d, d, d], dim=1)
    return [(name, t.reshape(-1, *rest)) for name, t in zip(unit.hf_names, (q, k, v))]


_HF_LAYER = re.compile(r"^model\.layers\.(\d+)\.")


def _mtp_layer(name: str, arch: MoEArchitecture) -> bool:
    """Whether ``name`` belongs to a multi-token-prediction layer (DeepSeek-V3 and GLM-4.5 store
    them as ``model.layers.{num_hidden_layers + j}``)."""
    m = _HF_LAYER.match(name)
    return bool(m) and arch.num_layers <= int(m.group(1)) < arch.num_layers + arch.num_mtp_layers


def _check_checkpoint(ckpt: _Checkpoint, arch: MoEArchitecture) -> None:
    """ValueError listing missing, unexpected and mis-shaped tensors, all at once."""
    expected = hf_tensor_shapes(arch)
    present = set(ckpt.files)
    if arch.tie_word_embeddings:
        present.discard("lm_head.weight")  # a redundant copy of the tied embedding
    mtp = sorted(name for name in present if _mtp_layer(name, arch))
    if mtp:
        _log.info("skipping %d tensors of the multi-token-prediction layer(s) (layers %d..%d): "
                  "MTP is not part of the policy", len(mtp), arch.num_layers,
                  arch.num_layers + arch.num_mtp_layers - 1)
        present -= set(mtp)
    missing = sorted(expected.keys() - present)
    unexpected = sorted(present - expected.keys())
    misshaped = [f"{name} {list(ckpt.shape(name))} (expected {list(expected[name])})"
                 for name in sorted(expected.keys() & present)
                 if ckpt.shape(name) != expected[name]]
    if missing or unexpected or misshaped:
        raise ValueError(f"HF checkpoint does not match the {arch.family} architecture: "
                         + _describe(missing=missing, unexpected=unexpected,
                                     mis_shaped=misshaped))


@torch.no_grad()
def load_hf_weights(model: torch.nn.Module, hf_dir: str | Path, arch: MoEArchitecture,
                    layout: ParallelLayout) -> None:
    """Copy an HF safetensors checkpoint into this rank's shard of ``model`` (GPTModel or DDP).

    Every Megatron parameter is written exactly once, cast to its dtype; raises ValueError, naming
    the tensors, if the checkpoint or the model does not match ``arch``. With a mixed-precision or
    distributed optimizer already built, call its ``reload_model_params()`` afterwards.
    """
    units = {unit.key: unit for unit in _units(arch)}
    local = _local_params(model, arch, layout)
    with contextlib.ExitStack() as stack:
        ckpt = _Checkpoint(Path(hf_dir), stack)
        _check_checkpoint(ckpt, arch)
        for key, param in local.items():
            unit = units[key]
            shard, num_shards = _shard_coords(unit, layout, param)
            value = _read_shard(ckpt, unit, arch, shard, num_shards)
            if value.shape != param.shape:
                raise ValueError(f"{key}: checkpoint shard {list(value.shape)} does not fit the "
                                 f"parameter {list(param.shape)} (layout tp={layout.tp} "
                                 f"ep={layout.ep} etp={layout.etp})")
            param.copy_(value)


def export_hf_weights(model: torch.nn.Module, arch: MoEArchitecture, layout: ParallelLayout, *,
                      groups: ProcessGroups, source: str = "param",
                      dtype: torch.dtype | None = None) -> Iterator[tuple[str, torch.Tensor]]:
    """Yield ``(hf_name, full_tensor)`` for the whole model, in :func:`hf_tensor_shapes` order.

    Collective: every rank must iterate to the end, in step. Every rank yields every full tensor
    (gathers are all-gathers, experts are broadcast from their owner within the EP group), so
    rank 0 has what it needs and the others may drop theirs. ``source="main_grad"`` exports the
    gradients Megatron DDP accumulated instead of the weights (same layout, same names). Tensors
    may alias live parameters: copy one to keep it across an optimizer step. ``dtype`` casts.
    """
    if source not in ("param", "main_grad"):
        raise ValueError(f"source must be 'param' or 'main_grad', got {source!r}")
    local = _local_params(model, arch, layout)
    if source == "main_grad":
        params = {k: p for k, p in local.items() if isinstance(p, torch.nn.Parameter)}
        if any(getattr(p, "main_grad", None) is None for p in params.values()):
            raise ValueError("source='main_grad' needs the model wrapped in Megatron DDP")
        # Buffers (the frozen expert bias) get no gradient: exported as zeros.
        local = {key: params[key].main_grad if key in params else torch.zeros_like(p)
                 for key, p in local.items()}
    etp_group = _expert_tp(layout)[1]
    experts_per_rank = arch.num_experts // layout.ep
    for unit in _units(arch):
        if unit.expert is None:
            mine = local[unit.key].detach()
            shards = ([mine] if _replicated(unit, mine)
                      else _all_gather(mine, layout.tp, groups.tp))
        else:
            mine = _expert_from_owner(local, unit, experts_per_rank, layout, groups.ep)
            shards = _all_gather(mine, layout.etp, etp_group)
        for name, full in _merge_shards(unit, shards, arch):
            yield name, full if dtype is None else full.to(dtype)


def _all_gather(tensor: torch.Tensor, size: int, group) -> list[torch.Tensor]:
    if size == 1:
        return [tensor]
    shards = [torch.empty_like(tensor) for _ in range(size)]
    dist.all_gather(shards, tensor.contiguous(), group=group)
    return shards


def _expert_from_owner(local: dict[str, torch.Tensor], unit: Unit, experts_per_rank: int,
                       layout: ParallelLayout, ep_group) -> torch.Tensor:
    """Expert ``unit.expert``'s (expert-TP shard of the) tensor, broadcast from its EP owner."""
    if layout.ep == 1:
        return local[unit.key].detach()
    owner = unit.expert // experts_per_rank
    if owner == layout.ep_rank:
        buf = local[unit.key].detach().contiguous()
    else:
        # Same layer and projection, one of this rank's experts: same shape and dtype.
        mine = unit.key.replace(f".experts.{unit.expert}.",
                                f".experts.{layout.ep_rank * experts_per_rank}.")
        buf = torch.empty_like(local[mine])
    dist.broadcast(buf, group=ep_group, group_src=owner)
    return buf


def save_hf_checkpoint(model: torch.nn.Module, arch: MoEArchitecture, layout: ParallelLayout,
                       groups: ProcessGroups, out_dir: str | Path, hf_config_dir: str | Path, *,
                       dtype: torch.dtype | None = None,
                       max_shard_bytes: int = 5 * 2**30) -> None:
    """Write the model as an HF checkpoint that ``transformers`` loads (collective).

    Rank 0 writes it with :func:`moerl.hf_io.write_hf_checkpoint` (one shard in memory at a
    time, the non-weight files of ``hf_config_dir`` copied alongside); the other ranks take part
    in the gathers only.
    """
    tensors = export_hf_weights(model, arch, layout, groups=groups, dtype=dtype)
    if dist.get_rank() == 0:
        write_hf_checkpoint(tensors, out_dir, config_dir=hf_config_dir,
                            max_shard_bytes=max_shard_bytes)
    else:
        for _ in tensors:
            pass
    dist.barrier(group=groups.world)
