"""torchrun script: the actor's skip-on-non-finite and reference-by-weight-swap contracts.

Two actors start from the same weights. Actor A takes a NaN step and then a good step; actor B
takes only the good step. If the skipped step left no trace, A and B end bitwise identical.
After A's update its reference log-probs must still be the initial policy's, bit for bit, and
the swap must put the trained weights back exactly. Prints one JSON line on rank 0.
"""

import json
import sys

import torch

from moerl.batch import Sample, pack_samples
from moerl.trainer.actor import Actor, PassSettings
from moerl.trainer.model import architecture_from_hf
from moerl.trainer.parallel import destroy_parallel, init_parallel
from moerl.trainer.routing_replay import ReplayMode

hf_dir = sys.argv[1]
layout, groups = init_parallel(tp=2, ep=2, etp=1, seed=1)
arch = architecture_from_hf(json.load(open(f"{hf_dir}/config.json")))
seqs = [[1, 5, 4, 13, 5, 6, 16, 7, 7, 2], [1, 5, 4, 13, 5, 6, 16, 7, 8, 2]]
samples = [Sample(group_index=0, sample_index=i, prompt_ids=s[:7], response_ids=s[7:],
                  rollout_logprobs_R=torch.zeros(3), full_logprobs_R=torch.zeros(3),
                  finish_reason="stop") for i, s in enumerate(seqs)]
batch = pack_samples(samples, pad_id=0, pad_multiple=2)
rows = torch.arange(2)
settings = PassSettings(temperature=1.0, keep_sampling_mask=False, replay=ReplayMode.NONE,
                        micro_batch_size=2)


def good(mb, logprobs, _):
    return -(logprobs * mb.response_mask_BT).sum(), {}


def bad(mb, logprobs, _):
    return -(logprobs * mb.response_mask_BT).sum() * float("nan"), {}


def run(with_nan: bool):
    from megatron.core.transformer.moe.router_replay import RouterReplay

    RouterReplay.clear_global_router_replay_instances()
    actor = Actor(arch=arch, layout=layout, groups=groups, hf_path=hf_dir, ref_path="",
                  bf16=False, recompute=False, token_dispatcher=None, optim=dict(lr=1e-3))
    before = [p.detach().clone() for p in actor.model.parameters()]
    batch.old_logprobs_BT = batch.trainer_routes_BTLK = batch.ref_logprobs_BT = None
    actor.compute_old_logprobs(batch, rows, settings)
    initial_logprobs = batch.old_logprobs_BT.clone()
    results = []
    if with_nan:
        result, _ = actor.train_step(batch, rows, settings, bad, with_entropy=False)
        unchanged = all(torch.equal(b, p) for b, p in zip(before, actor.model.parameters()))
        results.append({"ok": result.ok, "reason": result.skipped_reason,
                        "unchanged": unchanged})
    result, _ = actor.train_step(batch, rows, settings, good, with_entropy=False)
    trained = [p.detach().clone() for p in actor.model.parameters()]
    actor.compute_ref_logprobs(batch, rows, settings)
    batch.old_logprobs_BT = None
    actor.compute_old_logprobs(batch, rows, settings)
    results.append({
        "ok": result.ok,
        "ref_is_initial": torch.equal(batch.ref_logprobs_BT, initial_logprobs),
        "policy_moved": not torch.equal(batch.old_logprobs_BT, initial_logprobs),
        "weights_restored": all(torch.equal(t, p) for t, p in zip(trained,
                                                                  actor.model.parameters()))})
    return results, trained


res_a, weights_a = run(with_nan=True)
res_b, weights_b = run(with_nan=False)
same = all(torch.equal(a, b) for a, b in zip(weights_a, weights_b))
if layout.rank == 0:
    print(json.dumps({"nan_step": res_a[0], "good_step": res_a[1],
                      "identical_to_clean_run": same}))
destroy_parallel()
