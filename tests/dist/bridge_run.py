"""Spawned by tests/test_hf_bridge.py: HF load -> export round trip and log-probs per layout.

    torchrun ... bridge_run.py --ckpts DIR [DIR ...] --out DIR --layouts 2,2,1 1,2,1 [--save-hf]
                               [--also-ckpt DIR ...] [--broken DIR ...]

For each checkpoint and layout ``tp,ep,etp`` (one world, Megatron's groups re-initialised): load,
export, compare every exported tensor bit for bit with the files, and write the log-probs of the
fixed batch (``logp_<ckpt name>_<tp>_<ep>_<etp>.pt``). With the first checkpoint at the first
layout: ``--also-ckpt``, other checkpoints of the same weights (e.g. sharded with an index),
loaded and compared the same way; ``--broken``, checkpoints that must fail to load (the error text
is recorded); ``--save-hf``, save_hf_checkpoint to ``<out>/saved_hf`` and, in small shards
with an index, to ``<out>/saved_hf_sharded``.
"""

import argparse
import json
import warnings
from pathlib import Path

warnings.filterwarnings("ignore")

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
from model_common import (  # noqa: E402
    export_dict, fixed_batch, init_layout, load_arch, target_logprobs, write_json)
from safetensors.torch import load_file  # noqa: E402

from moerl.trainer.hf_bridge import (  # noqa: E402
    hf_tensor_shapes, load_hf_weights, save_hf_checkpoint)
from moerl.trainer.model import build_gpt_model  # noqa: E402


def on_disk(ckpt: Path) -> dict:
    tensors = {}
    for file in sorted(ckpt.glob("*.safetensors")):
        tensors.update(load_file(file))
    return tensors


def round_trip(model, ckpt: Path, arch, layout, groups) -> dict:
    exported = export_dict(model, arch, layout, groups)
    disk = on_disk(ckpt)
    if arch.tie_word_embeddings:
        disk.pop("lm_head.weight", None)
    return {
        "order_ok": list(exported) == list(hf_tensor_shapes(arch)),
        "missing": sorted(disk.keys() - exported.keys()),
        "extra": sorted(exported.keys() - disk.keys()),
        "mismatched": sorted(k for k in disk.keys() & exported.keys()
                             if disk[k].dtype != exported[k].dtype
                             or not torch.equal(disk[k], exported[k])),
    }


def extras(args, model, arch, layout, groups) -> dict:
    ckpt, out = Path(args.ckpts[0]), Path(args.out)
    res = {}
    for other in args.also_ckpt:
        load_hf_weights(model, other, arch, layout)
        res[f"also:{Path(other).name}"] = round_trip(model, ckpt, arch, layout, groups)
    errors = {}
    for broken in args.broken:
        try:
            load_hf_weights(model, broken, arch, layout)
            errors[Path(broken).name] = None
        except ValueError as exc:
            errors[Path(broken).name] = str(exc)
    res["broken"] = errors
    if args.save_hf:
        load_hf_weights(model, ckpt, arch, layout)
        save_hf_checkpoint(model, arch, layout, groups, out / "saved_hf", ckpt)
        # Small shards: several files and model.safetensors.index.json.
        save_hf_checkpoint(model, arch, layout, groups, out / "saved_hf_sharded", ckpt,
                           max_shard_bytes=200_000)
    return res


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--ckpts", nargs="+", required=True)
    ap.add_argument("--out", required=True)
    ap.add_argument("--layouts", nargs="+", required=True)
    ap.add_argument("--also-ckpt", nargs="*", default=[])
    ap.add_argument("--broken", nargs="*", default=[])
    ap.add_argument("--save-hf", action="store_true")
    args = ap.parse_args()
    out = Path(args.out)
    results = {}
    for c, ckpt in enumerate(map(Path, args.ckpts)):
        arch = load_arch(ckpt)
        ids, positions = fixed_batch(arch.vocab_size)
        for i, spec in enumerate(args.layouts):
            tp, ep, etp = (int(x) for x in spec.split(","))
            layout, groups = init_layout(tp, ep, etp)
            model = build_gpt_model(arch, layout)
            load_hf_weights(model, ckpt, arch, layout)
            res = {"rank": layout.rank, **round_trip(model, ckpt, arch, layout, groups)}
            with torch.no_grad():
                logp = target_logprobs(model, ids, positions, tp, arch.vocab_size)
            if c == 0 and i == 0:
                res.update(extras(args, model, arch, layout, groups))
            # Every rank reports its own view (every rank yields every tensor).
            all_res = [None] * dist.get_world_size()
            dist.all_gather_object(all_res, res)
            if layout.rank == 0:
                torch.save(logp, out / f"logp_{ckpt.name}_{tp}_{ep}_{etp}.pt")
                results[f"{ckpt.name}/{spec}"] = all_res
    if dist.get_rank() == 0:  # merged with earlier launches into the same folder
        file = out / "bridge_results.json"
        earlier = json.loads(file.read_text()) if file.exists() else {}
        write_json(file, {**earlier, **results})
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
