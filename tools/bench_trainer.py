"""Trainer micro-benchmarks; prints one JSON object.

    python tools/bench_trainer.py [--part replay|logprobs|bypass|all] [sizes...]
    torchrun --nproc_per_node N tools/bench_trainer.py --tp T --ep E ...   (optional)

(a) ``replay``: one full training step (forward, vocab-parallel log-prob loss, backward) through
    the Megatron MoE model, natural routing vs r3 replay, on the same batch with the same weights.
    The variants alternate (order flipped every round) so drift in machine load hits both; the
    report gives each variant's median and the ratio of medians. The rollout routes are converted
    once, outside the timed region, as the trainer does (``routes_to_megatron``). Two route sets:
    ``r3_same_routes`` replays the model's own natural routes (identical expert load, so the ratio
    is replay's own cost), ``r3_random_routes`` replays uniformly random routes (what a mismatched
    rollout engine looks like; the load per expert changes, not only the mechanism). Goal:
    ``r3_same_routes / natural <= 1.02``. Reported for wall time and for this process's CPU time
    (robust to other processes on a shared CPU machine; on GPU, wall time is the measure).
(b) ``logprobs``: ``vocab_parallel_logprobs`` with the keep mask (k kept ids per token) vs the
    full vocabulary, forward + backward, for V = 32768 by default: time ratio (goal <= 1.10) and
    peak memory of the forward and of forward + backward beyond the inputs. Memory is measured by
    a ``TorchDispatchMode`` that counts every storage an op allocates and frees it when the
    storage dies (CPU), or by ``torch.cuda.max_memory_allocated`` on GPU. The backward's output
    (the ``[N, V]`` logits gradient) is reported separately: it is the gradient itself, not
    overhead, and it is the same with and without a mask.
(c) ``bypass``: what ``algorithm.bypass_old_logprobs`` saves per RL step. Bypass mode takes the
    engine's log-probs as pi_old and skips the old-log-prob pass: a no-grad forward that records
    the natural routes and computes log-probs and entropy (``Actor.compute_old_logprobs``). The
    part times that pass and one training step (forward + backward) on the replay model and
    batch, alternating, and reports the median seconds saved per step (one old-log-prob pass over
    the batch) and that saving as a fraction of old pass + update.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
import weakref

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description="moerl trainer micro-benchmarks")
    parser.add_argument("--part", choices=["replay", "logprobs", "bypass", "all"], default="all")
    parser.add_argument("--tp", type=int, default=1)
    parser.add_argument("--ep", type=int, default=1)
    parser.add_argument("--rounds", type=int, default=11, help="A/B rounds per variant")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=None,
                        help="torch intra-op threads (default: torch's choice)")
    g = parser.add_argument_group("replay model (random init)")
    g.add_argument("--hidden", type=int, default=512)
    g.add_argument("--layers", type=int, default=4, help="layer 0 is dense, the rest MoE")
    g.add_argument("--experts", type=int, default=16)
    g.add_argument("--topk", type=int, default=4)
    g.add_argument("--expert-ffn", type=int, default=256)
    g.add_argument("--model-vocab", type=int, default=8192)
    g.add_argument("--batch", type=int, default=4)
    g.add_argument("--seq", type=int, default=256)
    g.add_argument("--recompute", action="store_true", help="full activation recompute")
    g.add_argument("--bf16", action="store_true")
    g = parser.add_argument_group("masked log-probs")
    g.add_argument("--vocab", type=int, default=32768)
    g.add_argument("--tokens", type=int, default=2048)
    g.add_argument("--kept", type=int, nargs="+", default=[1, 16, 64, 256, 1024])
    return parser.parse_args(argv)


def _device() -> torch.device:
    return torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else (
        torch.device("cpu"))


def _sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def _timed(fn) -> tuple[float, float]:
    """(wall seconds, this process's CPU seconds) of one call."""
    _sync()
    wall, cpu = time.perf_counter(), time.process_time()
    fn()
    _sync()
    return time.perf_counter() - wall, time.process_time() - cpu


def interleaved(variants: dict, rounds: int) -> tuple[dict, dict]:
    """Wall and process-CPU seconds per call of each variant, alternating (order reversed every
    other round). On a shared CPU machine the process CPU time is the load-robust measure: other
    processes' time slices do not count in it."""
    names = list(variants)
    wall = {name: [] for name in names}
    cpu = {name: [] for name in names}
    for fn in variants.values():  # warm-up
        fn()
    for r in range(rounds):
        for name in names if r % 2 == 0 else reversed(names):
            w, c = _timed(variants[name])
            wall[name].append(w)
            cpu[name].append(c)
    return wall, cpu


# ----------------------------------------------------------------------------- (a) replay


def _bench_model(args, layout):
    """The benchmark's random-init MoE (layer 0 dense), in training mode, and its architecture.
    Megatron's RouterReplay instances are process-global: a part's model replaces the last's."""
    from megatron.core.transformer.moe.router_replay import RouterReplay

    from moerl.tiny_model import TINY_QWEN3_MOE
    from moerl.trainer.model import architecture_from_hf, build_gpt_model

    RouterReplay.clear_global_router_replay_instances()

    heads = max(args.hidden // 64, 2)
    arch = architecture_from_hf({
        **TINY_QWEN3_MOE, "model_type": "qwen3_moe", "hidden_size": args.hidden,
        "num_hidden_layers": args.layers, "num_attention_heads": heads,
        "num_key_value_heads": max(heads // 2, 1), "head_dim": 64,
        "intermediate_size": 4 * args.hidden, "moe_intermediate_size": args.expert_ffn,
        "num_experts": args.experts, "num_experts_per_tok": args.topk,
        "vocab_size": args.model_vocab, "max_position_embeddings": max(args.seq, 512)})
    model = build_gpt_model(arch, layout, bf16=args.bf16, recompute=args.recompute)
    if args.bf16:
        from megatron.core.transformer.module import Float16Module

        model = Float16Module(model.config, model)
    model.train()
    return model, arch


def bench_replay(args, layout, groups) -> dict:
    from moerl.trainer.logprobs import vocab_parallel_logprobs
    from moerl.trainer.routing_replay import RoutingReplay, routes_to_megatron

    model, arch = _bench_model(args, layout)
    device = _device()
    replay = RoutingReplay(arch, layout, tp_group=groups.tp)
    gen = torch.Generator().manual_seed(args.seed)
    b, s = args.batch, args.seq
    ids_BS = torch.randint(0, arch.vocab_size, (b, s), generator=gen).to(device)
    pos_BS = torch.arange(s, device=device).expand(b, s)
    targets_N = ids_BS[:, 1:].reshape(-1)

    def loss_of(logits_BSV):
        logp_N = vocab_parallel_logprobs(logits_BSV[:, :-1].reshape(-1, logits_BSV.shape[-1]),
                                         targets_N, tp_group=groups.tp, vocab_size=arch.vocab_size)
        return -logp_N.mean()

    def natural_step():
        model.zero_grad(set_to_none=True)
        loss_of(model(ids_BS, pos_BS, attention_mask=None)).backward()

    def replay_step(routes):
        def step():
            model.zero_grad(set_to_none=True)
            with replay.replay(routes) as handle:
                loss = loss_of(model(ids_BS, pos_BS, attention_mask=None))
                handle.switch_to_backward()
                loss.backward()
        return step

    # Rollout routes in SGLang's wire layout [T-1, L_all, K] (dense rows zero), converted once.
    with torch.no_grad(), replay.record(batch_size=b, seq_len=s) as recorded:
        model(ids_BS, pos_BS, attention_mask=None)
    same = _to_wire(recorded.routes_BTLK.cpu(), arch)
    random_ids = torch.rand(b, s, len(arch.moe_layer_ids), arch.num_experts, generator=gen)
    rand = _to_wire(random_ids.argsort(-1)[..., : arch.top_k].to(torch.int32), arch)
    variants = {
        "natural": natural_step,
        "r3_same_routes": replay_step(routes_to_megatron(same, seq_len=s, arch=arch,
                                                         layout=layout, device=device)),
        "r3_random_routes": replay_step(routes_to_megatron(rand, seq_len=s, arch=arch,
                                                           layout=layout, device=device)),
    }
    wall, cpu = interleaved(variants, args.rounds)
    return {
        "model": {"hidden": args.hidden, "layers": args.layers, "experts": args.experts,
                  "topk": args.topk, "expert_ffn": args.expert_ffn, "vocab": args.model_vocab,
                  "batch": b, "seq": s, "recompute": args.recompute, "bf16": args.bf16},
        "wall": summarize(wall, baseline="natural"),
        "process_cpu": summarize(cpu, baseline="natural"),
    }


def bench_bypass(args, layout, groups) -> dict:
    from moerl.trainer.logprobs import vocab_parallel_entropy, vocab_parallel_logprobs
    from moerl.trainer.routing_replay import RoutingReplay

    model, arch = _bench_model(args, layout)
    device = _device()
    replay = RoutingReplay(arch, layout, tp_group=groups.tp)
    gen = torch.Generator().manual_seed(args.seed)
    b, s = args.batch, args.seq
    ids_BS = torch.randint(0, arch.vocab_size, (b, s), generator=gen).to(device)
    pos_BS = torch.arange(s, device=device).expand(b, s)
    targets_N = ids_BS[:, 1:].reshape(-1)

    def logits_NV():
        logits_BSV = model(ids_BS, pos_BS, attention_mask=None)
        return logits_BSV[:, :-1].reshape(-1, logits_BSV.shape[-1])

    def old_logprob_pass():
        # What the trainer's old-log-prob pass does per micro-batch (and bypass skips).
        with torch.no_grad(), replay.record(batch_size=b, seq_len=s):
            logits = logits_NV()
            vocab_parallel_logprobs(logits, targets_N, tp_group=groups.tp)
            vocab_parallel_entropy(logits, tp_group=groups.tp)

    def update():
        model.zero_grad(set_to_none=True)
        (-vocab_parallel_logprobs(logits_NV(), targets_N, tp_group=groups.tp).mean()).backward()

    wall, cpu = interleaved({"update": update, "old_logprob_pass": old_logprob_pass},
                            args.rounds)
    out = {"batch": b, "seq": s}
    for clock, times in (("wall", wall), ("process_cpu", cpu)):
        saved = statistics.median(times["old_logprob_pass"])
        step = saved + statistics.median(times["update"])
        out[clock] = {"median_s": {k: statistics.median(v) for k, v in times.items()},
                      "saved_s_per_step": saved, "saved_frac_of_old_pass_plus_update": saved / step}
    return out


def summarize(times: dict[str, list[float]], *, baseline: str) -> dict:
    """Medians and ratios of medians (the headline), plus two load-robust views: ratios of the
    fastest runs, and the median of per-round paired ratios (same round, adjacent in time)."""
    med = {name: statistics.median(t) for name, t in times.items()}
    best = {name: min(t) for name, t in times.items()}
    others = [name for name in times if name != baseline]
    return {
        "rounds": len(times[baseline]),
        "median_s": med,
        "ratio_of_medians": {name: med[name] / med[baseline] for name in others},
        "ratio_of_min": {name: best[name] / best[baseline] for name in others},
        "median_paired_ratio": {name: statistics.median(
            x / y for x, y in zip(times[name], times[baseline])) for name in others},
        "times_s": times,
    }


def _to_wire(routes_BTLK: torch.Tensor, arch) -> list[torch.Tensor]:
    """[B, T, L_moe, K] -> per sample [T-1, L_all, K] with zero rows for dense layers."""
    b, t, _, k = routes_BTLK.shape
    wire = torch.zeros(b, t - 1, arch.num_layers, k, dtype=torch.int32)
    wire[:, :, arch.moe_layer_ids] = routes_BTLK[:, :-1]
    return list(wire)


# ----------------------------------------------------------------------------- (b) logprobs


class AllocationTracker(TorchDispatchMode):
    """Live and peak bytes of the storages that ops allocate while the mode is active.

    A storage is counted when an op first returns it and uncounted when it is freed (weakref
    finalizer on the storage; PyTorch keeps one Python object per live storage). Views share
    their base's storage and are not counted again; neither are storages an op received as an
    input before any op of the mode returned them (tensors created before the mode, and views of
    them), so only what the measured code allocates counts.
    """

    def __init__(self) -> None:
        super().__init__()
        self.live: dict[int, int] = {}
        self.external: set[int] = set()
        self.current = 0
        self.peak = 0

    def _free(self, key: int) -> None:
        self.current -= self.live.pop(key)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        for t in tree_flatten((args, kwargs))[0]:
            if isinstance(t, torch.Tensor):
                storage = t.untyped_storage()
                key = storage.data_ptr()
                if key not in self.live and key not in self.external:
                    self.external.add(key)
                    weakref.finalize(storage, self.external.discard, key)
        out = func(*args, **(kwargs or {}))
        for t in tree_flatten(out)[0]:
            if not isinstance(t, torch.Tensor):
                continue
            storage = t.untyped_storage()
            key, nbytes = storage.data_ptr(), storage.nbytes()
            if nbytes == 0 or key in self.live or key in self.external:
                continue
            self.live[key] = nbytes
            self.current += nbytes
            self.peak = max(self.peak, self.current)
            weakref.finalize(storage, self._free, key)
        return out


def _peak_bytes(fn) -> int:
    """Peak bytes allocated by ``fn`` beyond what existed before (its results may stay alive)."""
    if torch.cuda.is_available():
        _sync()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        fn()
        _sync()
        return torch.cuda.max_memory_allocated() - base
    with AllocationTracker() as tracker:
        fn()
    return tracker.peak


def bench_logprobs(args, tp_group) -> dict:
    from moerl.trainer.logprobs import vocab_parallel_logprobs

    device = _device()
    dtype = torch.bfloat16 if args.bf16 else torch.float32
    gen = torch.Generator().manual_seed(args.seed)
    n, v = args.tokens, args.vocab
    tp = torch.distributed.get_world_size(tp_group) if tp_group is not None else 1
    rank = torch.distributed.get_rank(tp_group) if tp_group is not None else 0
    full_NV = torch.randn(n, v, generator=gen)
    logits_NV = full_NV[:, rank * v // tp:(rank + 1) * v // tp].to(device, dtype).contiguous()
    logits_NV.requires_grad_(True)
    del full_NV
    targets_N = torch.randint(0, v, (n,), generator=gen)

    def masks(k):
        # k distinct random ids per row, the target among them (the rollout client's guarantee)
        scores_NV = torch.rand(n, v, generator=gen)
        scores_NV[torch.arange(n), targets_N] = 2.0
        ids_NK = scores_NV.topk(k, dim=-1).indices
        return (ids_NK.reshape(-1).to(torch.int32).to(device),
                torch.arange(0, n * k + 1, k, dtype=torch.int64).to(device))

    tgt = targets_N.to(device)

    def run(kept, backward: bool):
        def fn():
            logits_NV.grad = None
            logp = vocab_parallel_logprobs(logits_NV, tgt, tp_group=tp_group,
                                           kept_ids_M=kept[0] if kept else None,
                                           kept_offsets_N1=kept[1] if kept else None)
            if backward:
                logp.sum().backward()
        return fn

    grad_bytes = logits_NV.numel() * logits_NV.element_size()
    variants = {"full": run(None, True)}
    kept_sets = {}
    for k in args.kept:
        kept_sets[k] = masks(k)
        variants[f"kept_{k}"] = run(kept_sets[k], True)
    times, _ = interleaved(variants, args.rounds)
    med = {name: statistics.median(t) for name, t in times.items()}
    timing = summarize(times, baseline="full")
    rows = []
    for k in [None, *args.kept]:
        kept = kept_sets[k] if k else None
        name = f"kept_{k}" if k else "full"
        fwd = _peak_bytes(run(kept, False))
        logits_NV.grad = None
        fwd_bwd = _peak_bytes(run(kept, True))
        logits_NV.grad = None
        rows.append({"kept_per_token": k or "all", "kept_ids_M": n * k if k else None,
                     "median_fwd_bwd_s": med[name],
                     "time_ratio_vs_full": timing["ratio_of_medians"].get(name, 1.0),
                     "paired_time_ratio_vs_full": timing["median_paired_ratio"].get(name, 1.0),
                     "peak_fwd_bytes": fwd, "peak_fwd_bwd_bytes_beyond_grad": fwd_bwd - grad_bytes})
    return {"tokens": n, "vocab": v, "tp": tp, "dtype": str(dtype).replace("torch.", ""),
            "logits_bytes": grad_bytes, "tokens_x_vocab_fp32_bytes": n * v // tp * 4,
            "rounds": args.rounds, "rows": rows}


def main(argv=None) -> int:
    args = parse_args(argv)
    from moerl.trainer.parallel import destroy_parallel, init_parallel

    layout, groups = init_parallel(tp=args.tp, ep=args.ep, etp=1, seed=args.seed)
    torch.manual_seed(args.seed)
    if args.threads:
        torch.set_num_threads(args.threads)
    try:
        result = {"device": str(_device()), "world": layout.world, "tp": layout.tp,
                  "ep": layout.ep, "torch_threads": torch.get_num_threads()}
        if args.part in ("replay", "all"):
            result["replay"] = bench_replay(args, layout, groups)
        if args.part in ("bypass", "all"):
            result["bypass"] = bench_bypass(args, layout, groups)
        if args.part in ("logprobs", "all"):
            result["logprobs"] = bench_logprobs(args, groups.tp if layout.tp > 1 else None)
        if layout.rank == 0:
            print(json.dumps(result), flush=True)
    finally:
        destroy_parallel()
    return 0


if __name__ == "__main__":
    sys.exit(main())
