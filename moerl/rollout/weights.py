"""Write checkpoint-named tensors into a loaded transformers model, in place.

Hugging Face MoE checkpoints (and the trainer's weight push) name experts one by one
(``model.layers.3.mlp.experts.7.gate_proj.weight``), while transformers >= 5 keeps them fused in
memory (``mlp.experts.gate_up_proj`` ``[E, 2I, H]`` with the gate rows first, ``mlp.experts.down_proj``
``[E, H, I]``). ``from_pretrained`` converts with ``conversion_mapping.py``'s ``qwen2_moe`` and
``mixtral`` recipes (``MergeModulelist(dim=0)`` then ``Concatenate(dim=1)``); an in-place update
receives arbitrary subsets of tensors (one bucket at a time), so moerl maps each name to its slot
instead of re-running those whole-layer converters. ``tests/test_rollout_engine.py`` loads a
checkpoint through this mapping and through ``from_pretrained`` and requires identical weights,
so a change of the upstream layout fails that test rather than silently corrupting weights.
Target: transformers 5.23 (Qwen2/Qwen3-MoE naming ``experts.{e}.{gate,up,down}_proj``, Mixtral
naming ``block_sparse_moe.experts.{e}.{w1,w3,w2}``).
"""

from __future__ import annotations

import re
import stat
from pathlib import Path
from typing import Iterable, Iterator

import torch

_EXPERT = re.compile(r"^(?P<prefix>.+\.experts)\.(?P<e>\d+)\.(?P<proj>gate_proj|up_proj|down_proj"
                     r"|w1|w2|w3)\.weight$")
_GATE_UP_HALF = {"gate_proj": 0, "w1": 0, "up_proj": 1, "w3": 1}


class CheckpointWriter:
    """Maps checkpoint tensor names to (parameter, slot) of a transformers model and copies into it."""

    def __init__(self, model: torch.nn.Module):
        self._params = dict(model.named_parameters())
        # Persistent buffers a checkpoint carries too (DeepSeek-V3/GLM-4.5's router
        # e_score_correction_bias); non-persistent ones (RoPE tables) are not in the state dict.
        persistent = model.state_dict().keys()
        self._params.update((n, b) for n, b in model.named_buffers() if n in persistent)
        tied = getattr(model.config, "tie_word_embeddings", False)
        self._skip = {"lm_head.weight"} if tied and "lm_head.weight" not in self._params else set()

    def _slot(self, name: str) -> tuple[torch.Tensor, tuple]:
        canonical = name.replace(".block_sparse_moe.", ".mlp.")
        if canonical in self._params:
            return self._params[canonical], ()
        m = _EXPERT.match(canonical)
        if m is None:
            raise ValueError(f"unknown checkpoint tensor {name!r}: no parameter of the served model "
                             f"takes it (e.g. {next(iter(self._params))!r})")
        e, proj = int(m["e"]), m["proj"]
        if proj in ("down_proj", "w2"):
            fused = self._params.get(f"{m['prefix']}.down_proj")
            index: tuple = (e,)
        else:
            fused = self._params.get(f"{m['prefix']}.gate_up_proj")
            if fused is not None:
                half = fused.shape[1] // 2
                start = _GATE_UP_HALF[proj] * half
                index = (e, slice(start, start + half))
        if fused is None or e >= fused.shape[0]:
            raise ValueError(f"unknown checkpoint tensor {name!r}: no fused expert parameter "
                             f"with expert {e}")
        return fused, index

    def expected_shape(self, name: str) -> tuple[int, ...]:
        param, index = self._slot(name)
        return tuple(param[index].shape) if index else tuple(param.shape)

    def checkpoint_shapes(self) -> dict[str, tuple[int, ...]]:
        """Every checkpoint name the model accepts, with its shape (per-expert names for experts)."""
        shapes: dict[str, tuple[int, ...]] = {}
        for name, param in self._params.items():
            if name.endswith("experts.gate_up_proj"):
                prefix, half = name[: -len(".gate_up_proj")], param.shape[1] // 2
                for e in range(param.shape[0]):
                    for proj in ("gate_proj", "up_proj"):
                        shapes[f"{prefix}.{e}.{proj}.weight"] = (half, param.shape[2])
            elif name.endswith("experts.down_proj"):
                prefix = name[: -len(".down_proj")]
                for e in range(param.shape[0]):
                    shapes[f"{prefix}.{e}.down_proj.weight"] = tuple(param.shape[1:])
            else:
                shapes[name] = tuple(param.shape)
        return shapes

    def check(self, name: str, shape: Iterable[int]) -> None:
        """Raise ValueError unless ``name`` is a known tensor of exactly ``shape``."""
        if name in self._skip:
            return
        expected = self.expected_shape(name)
        if tuple(shape) != expected:
            raise ValueError(f"tensor {name!r} has shape {list(shape)}, the model expects "
                             f"{list(expected)}")

    def check_values(self, name: str, tensor: torch.Tensor) -> None:
        """Raise ValueError for values the model cannot serve with: an integer or boolean
        tensor (a silent cast) or non-finite entries (every later forward would be NaN)."""
        if name in self._skip:
            return
        if not tensor.is_floating_point():
            raise ValueError(f"tensor {name!r} has dtype {str(tensor.dtype).removeprefix('torch.')}"
                             f"; weights must be floating point")
        bad = int((~torch.isfinite(tensor)).sum())
        if bad:
            raise ValueError(f"tensor {name!r} has {bad} non-finite value(s) (NaN or inf)")

    @torch.no_grad()
    def write(self, named_tensors: Iterable[tuple[str, torch.Tensor]]) -> int:
        """Copy each tensor into its slot (cast to the parameter's dtype); returns how many."""
        count = 0
        for name, tensor in named_tensors:
            if name in self._skip:
                continue
            self.check(name, tensor.shape)
            param, index = self._slot(name)
            target = param[index] if index else param
            target.copy_(tensor.to(param.dtype))
            count += 1
        return count


def iter_safetensors_dir(path: str | Path) -> Iterator[tuple[str, torch.Tensor]]:
    """All tensors of the ``*.safetensors`` files of a Hugging Face checkpoint directory."""
    from safetensors import safe_open

    from safetensors import SafetensorError

    root = Path(path).resolve()
    files = sorted(Path(path).glob("*.safetensors"))
    if not files:
        raise ValueError(f"no *.safetensors files in {path}")
    for file in files:
        _check_regular_inside(file, root)
        try:
            with safe_open(str(file), framework="pt") as f:
                for name in f.keys():
                    yield name, f.get_tensor(name)
        except SafetensorError as e:
            raise ValueError(f"{file} is not a valid safetensors file: {e}") from None


def _check_regular_inside(file: Path, root: Path) -> None:
    """Refuse a symlink that leads out of the checkpoint directory, and anything that is not a
    regular file (a FIFO would block the reader forever)."""
    target = file.resolve()
    if not target.is_relative_to(root):
        raise ValueError(f"{file} links to {target}, outside the checkpoint directory {root}")
    if not stat.S_ISREG(target.stat().st_mode):
        raise ValueError(f"{file} is not a regular file")
