"""Writing Hugging Face safetensors checkpoints from a stream of named tensors.

One writer serves the trainer's HF export (``hf_bridge.save_hf_checkpoint``) and the rollout
manager's copy of the weights it pushes: tensors arrive one at a time (the bridge gathers them
from the shards as it goes) and at most one output shard is held in memory. The result is what
``transformers`` writes: ``model.safetensors``, or ``model-0000k-of-0000n.safetensors`` plus
``model.safetensors.index.json`` past ``max_shard_bytes``, next to the source checkpoint's
non-weight files (config, generation config, tokenizer).
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Iterable
from pathlib import Path

import torch

INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"
_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".safetensors.index.json",
                    ".bin.index.json")


def write_hf_checkpoint(named_tensors: Iterable[tuple[str, torch.Tensor]], out_dir: str | Path,
                        *, config_dir: str | Path | None = None,
                        max_shard_bytes: int = 5 * 2**30) -> Path:
    """Write ``(hf_name, tensor)`` pairs as an HF checkpoint directory; returns it.

    Tensors are copied to the host as they arrive (they may alias live parameters). Weight files
    of an earlier save into the same directory are replaced.
    """
    from safetensors.torch import save_file

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    files: list[Path] = []
    weight_map: dict[str, int] = {}
    bucket: dict[str, torch.Tensor] = {}
    bucket_bytes = 0
    for name, tensor in named_tensors:
        nbytes = tensor.numel() * tensor.element_size()
        if bucket and bucket_bytes + nbytes > max_shard_bytes:
            files.append(out / f".part{len(files)}.safetensors")
            save_file(bucket, files[-1], metadata={"format": "pt"})
            bucket, bucket_bytes = {}, 0
        bucket[name] = tensor.detach().to("cpu", copy=True).contiguous()
        bucket_bytes += nbytes
        weight_map[name] = len(files)
    files.append(out / f".part{len(files)}.safetensors")
    save_file(bucket, files[-1], metadata={"format": "pt"})
    _name_shards(out, files, weight_map)
    if config_dir is not None:
        _copy_non_weight_files(Path(config_dir), out)
    return out


def _name_shards(out: Path, files: list[Path], weight_map: dict[str, int]) -> None:
    """Rename the parts to transformers' file names, writing the index when there are several."""
    for stale in [*out.glob("model*.safetensors"), out / INDEX_FILE]:
        if stale.exists():
            stale.unlink()
    if len(files) == 1:
        files[0].rename(out / SINGLE_FILE)
        return
    names = [f"model-{i + 1:05d}-of-{len(files):05d}.safetensors" for i in range(len(files))]
    total = sum(f.stat().st_size for f in files)
    for file, name in zip(files, names):
        file.rename(out / name)
    index = {"metadata": {"total_size": total},
             "weight_map": {tensor: names[i] for tensor, i in weight_map.items()}}
    (out / INDEX_FILE).write_text(json.dumps(index, indent=2))


def _copy_non_weight_files(src: Path, dst: Path) -> None:
    if src.resolve() == dst.resolve():
        return
    for file in src.iterdir():
        if file.is_file() and not file.name.endswith(_WEIGHT_SUFFIXES):
            shutil.copy2(file, dst / file.name)
