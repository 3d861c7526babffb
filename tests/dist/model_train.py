"""Spawned by tests/test_model_parallel.py: one layout's forward, backward and optimizer steps.

    torchrun ... model_train.py --ckpt DIR --out DIR --layouts tp,ep,etp [tp,ep,etp ...]

Writes (rank 0, HF names, full tensors) ``<tag>_logp.pt``, ``<tag>_grads.pt`` (main_grad after
finalize_model_grads), ``<tag>_before.pt`` / ``<tag>_after.pt`` (weights around the first step)
and ``<tag>_results.json`` with every rank's checks, per layout (one world, groups re-initialised).
With data parallelism each DP rank takes its slice of the fixed batch; DDP sums gradients over DP
(``calculate_per_token_loss``), so the gradient is that of the whole batch, as in a TP=1 run.

- step 1: loss = sum of target log-probs; grad norm; which local parameters did not change.
- skip: an inf injected into one main_grad on the last rank only; the step must be skipped on all
  ranks with weights and optimizer state untouched.
- clip: a step with clip_grad far below the norm; the norm of the clipped gradient.
- warmup: learning rates of a fresh optimizer with 4 warmup steps, one step skipped.
- resume: save after the clip step, take one more step; rebuild model and optimizer from scratch,
  load, take the same step; the weights must be bit-identical.
"""

import argparse
import math
import tempfile
import warnings
from pathlib import Path

warnings.filterwarnings("ignore")

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
from model_common import (  # noqa: E402
    EPS, LR, WD, export_dict, fixed_batch, init_layout, load_arch, target_logprobs, write_json)

from moerl.trainer.hf_bridge import load_hf_weights  # noqa: E402
from moerl.trainer.model import build_gpt_model  # noqa: E402
from moerl.trainer.optimizer import build_optimizer  # noqa: E402


def fresh(arch, ckpt, layout, groups, *, clip: float, warmup_steps: int = 0):
    from megatron.core.transformer.moe.router_replay import RouterReplay

    RouterReplay.clear_global_router_replay_instances()
    model = build_gpt_model(arch, layout)
    load_hf_weights(model, ckpt, arch, layout)
    return build_optimizer(model, layout, groups, lr=LR, weight_decay=WD, adam_eps=EPS,
                           clip_grad=clip, warmup_steps=warmup_steps)


def backward(opt, arch, batch, tp: int, scale: float = 1.0):
    opt.zero_grad()
    logp = target_logprobs(opt.model, *batch, tp, arch.vocab_size)
    (logp.sum() * scale).backward()
    return logp.detach()


def dp_slice(batch, layout):
    """This DP rank's contiguous share of the batch's sequences."""
    ids, positions = batch
    n = ids.shape[0] // layout.dp
    rows = slice(layout.dp_rank * n, (layout.dp_rank + 1) * n)
    return ids[rows], positions[rows]


def gather_dp(logp, layout, groups):
    if layout.dp == 1:
        return logp
    parts = [torch.empty_like(logp) for _ in range(layout.dp)]
    dist.all_gather(parts, logp, group=groups.dp)
    return torch.cat(parts)


def local_state(opt) -> dict:
    """This rank's weights and flattened optimizer tensors (cloned), for equality checks."""
    out = {f"w:{n}": p.detach().clone() for n, p in opt.model.module.named_parameters()}
    for i, part in enumerate(opt._parts):
        for j, group in enumerate(part.optimizer.param_groups):
            for k, p in enumerate(group["params"]):
                out[f"main:{i}.{j}.{k}"] = p.detach().clone()  # fp32 main weight shards
                for key, t in part.optimizer.state[p].items():
                    out[f"state:{i}.{j}.{k}.{key}"] = torch.as_tensor(t).clone()
    return out


def differing(a: dict, b: dict) -> list:
    return sorted(k for k in a if not torch.equal(a[k], b[k]))


def step_one(opt, arch, layout, groups, batch, tag, out):
    """The parity step: returns this rank's checks; rank 0 saves the HF-layout tensors."""
    before_local = {n: p.detach().clone() for n, p in opt.model.module.named_parameters()}
    before = export_dict(opt.model, arch, layout, groups)
    logp = gather_dp(backward(opt, arch, batch, layout.tp), layout, groups)
    res = opt.step()
    grads = export_dict(opt.model, arch, layout, groups, source="main_grad")
    after = export_dict(opt.model, arch, layout, groups)
    # A vocabulary shard that is all Megatron padding (tiny vocabularies at TP > 1) gets no
    # gradient and stays zero, by design.
    rows = arch.padded_vocab_size(layout.tp) // layout.tp
    padding_only = layout.tp_rank * rows >= arch.vocab_size
    vocab_params = ("embedding.word_embeddings.weight", "output_layer.weight")
    unchanged = [n for n, p in opt.model.module.named_parameters()
                 if torch.equal(p.detach(), before_local[n])
                 and not (padding_only and n in vocab_params)]
    if layout.rank == 0:
        for name, obj in (("logp", logp), ("grads", grads), ("before", before), ("after", after)):
            torch.save(obj, out / f"{tag}_{name}.pt")
    return {"ok": res.ok, "grad_norm": res.grad_norm, "lr": res.lr,
            "num_local_params": len(before_local), "unchanged": unchanged}


def skip_check(opt, arch, layout, batch):
    backward(opt, arch, batch, layout.tp)
    if layout.rank == dist.get_world_size() - 1:
        # Only the last rank's gradient is bad: every rank must still skip.
        param = next(p for n, p in opt.model.module.named_parameters() if "experts" in n)
        param.main_grad.view(-1)[0] = float("inf")
    state = local_state(opt)
    res = opt.step()
    return {"ok": res.ok, "grad_norm": res.grad_norm, "reason": res.skipped_reason,
            "changed": differing(state, local_state(opt)), "num_updates": opt.num_updates}


def clip_check(opt, arch, layout, groups, batch, clip):
    backward(opt, arch, batch, layout.tp)
    opt.clip_grad = clip
    res = opt.step()
    grads = export_dict(opt.model, arch, layout, groups, source="main_grad")
    clipped = math.sqrt(sum(float(g.double().pow(2).sum()) for g in grads.values()))
    return {"ok": res.ok, "grad_norm": res.grad_norm, "clip": clip, "clipped_norm": clipped}


def warmup_check(arch, ckpt, layout, groups, batch):
    """Learning rates of four steps with warmup 4, the second one skipped (inf gradient)."""
    opt = fresh(arch, ckpt, layout, groups, clip=1e6, warmup_steps=4)
    lrs = []
    for i in range(4):
        backward(opt, arch, batch, layout.tp)
        if i == 1:
            next(iter(opt.model.module.parameters())).main_grad.view(-1)[0] = float("nan")
        lrs.append(opt.step().lr)
    return {"lrs": lrs, "num_updates": opt.num_updates}


def resume_check(opt, arch, ckpt, layout, groups, batch):
    with tempfile.TemporaryDirectory() as tmp:
        shared = [tmp]
        dist.broadcast_object_list(shared, src=0)  # one folder for all ranks
        opt.save(shared[0])
        backward(opt, arch, batch, layout.tp, scale=0.5)
        opt.step()
        continued = local_state(opt)
        opt2 = fresh(arch, ckpt, layout, groups, clip=opt.clip_grad)
        opt2.load(shared[0])
        backward(opt2, arch, batch, layout.tp, scale=0.5)
        opt2.step()
        resumed = local_state(opt2)
        dist.barrier()
    return {"differing": differing(continued, resumed), "num_updates": opt2.num_updates,
            "num_compared": len(continued)}


def run_layout(args, spec):
    tp, ep, etp = (int(x) for x in spec.split(","))
    layout, groups = init_layout(tp, ep, etp)
    arch = load_arch(args.ckpt)
    batch = dp_slice(fixed_batch(arch.vocab_size), layout)
    tag = f"{tp}_{ep}_{etp}"
    opt = fresh(arch, args.ckpt, layout, groups, clip=1e6)
    res = {"rank": layout.rank, "dp": layout.dp,
           "step1": step_one(opt, arch, layout, groups, batch, tag, Path(args.out))}
    if args.step_only:
        write_results(res, layout, Path(args.out) / f"{tag}_results.json")
        return
    res["skip"] = skip_check(opt, arch, layout, batch)
    res["clip"] = clip_check(opt, arch, layout, groups, batch, clip=1e-3)
    res["warmup"] = warmup_check(arch, args.ckpt, layout, groups, batch)
    res["resume"] = resume_check(opt, arch, args.ckpt, layout, groups, batch)
    write_results(res, layout, Path(args.out) / f"{tag}_results.json")


def write_results(res: dict, layout, path: Path) -> None:
    gathered = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, res)
    if layout.rank == 0:
        write_json(path, gathered)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--ckpt", required=True)
    ap.add_argument("--out", required=True)
    ap.add_argument("--layouts", nargs="+", required=True)
    ap.add_argument("--step-only", action="store_true",
                    help="only the parity step (log-probs, gradients, before/after weights)")
    args = ap.parse_args()
    for spec in args.layouts:
        run_layout(args, spec)
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
