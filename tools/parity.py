"""Parity of moerl's Megatron model with Hugging Face transformers on the same weights.

    torchrun --nproc_per_node N tools/parity.py --hf DIR --tp T --ep E [--etp K]
             [--batch B --seq S --seed X | --ids FILE] [--bf16] [--dump FILE]

Loads the HF checkpoint into the sharded Megatron model (``hf_bridge.load_hf_weights``), runs a
fixed random batch (token ids uniform over the vocabulary, every sequence full length, seeded) in
fp32 (``--bf16``: both models in bf16) with natural routing, and computes each next token's log-prob with
``logprobs.vocab_parallel_logprobs``; rank 0 runs the HF model (same dtype, eager attention, on
the trainer's device) on the same batch. Rank 0 prints one JSON line:

  max_abs_logp_diff, mean_abs_logp_diff   over the B * (S - 1) next-token log-probs
  route_agreement       fraction of (token, MoE layer) whose top-k expert *sets* agree between the
                        trainer's recorded routes and the HF routers' top-k (forward hooks)
  token_route_mismatch  fraction of tokens whose experts differ in at least one MoE layer
  plus the layout (world, tp, ep, etp, dp) and the batch shape.

``--ids FILE`` (a JSON list of equal-length token-id lists, e.g. a rollout engine's prompt +
response) replaces the random batch; ``--dump FILE`` saves the trainer side's ``logp_BS`` ``[B, S-1]``
and natural ``routes_BSLK`` ``[B, S, L_moe, K]`` (torch.save), to hold another engine to them.
Every data-parallel rank runs the same batch (the point is the model, not the data split).
Exits non-zero with a message when the checkpoint does not fit the layout.
"""

from __future__ import annotations

import argparse
import json
import sys

import torch


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--hf", required=True, help="HF checkpoint directory (safetensors)")
    parser.add_argument("--tp", type=int, default=1)
    parser.add_argument("--ep", type=int, default=1)
    parser.add_argument("--etp", type=int, default=1)
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--seq", type=int, default=32, help="a multiple of --tp")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--bf16", action="store_true", help="both models in bfloat16")
    parser.add_argument("--ids", help="JSON file: equal-length token-id lists to run instead of "
                        "the random batch (length a multiple of --tp)")
    parser.add_argument("--dump", help="torch.save the trainer's logp_BS and routes_BSLK here")
    return parser.parse_args(argv)


def trainer_side(args, arch, layout, groups, ids_BS):
    """Megatron log-probs [B, S-1] and recorded routes [B, S, L, K] (same on every rank)."""
    from moerl.trainer.hf_bridge import load_hf_weights
    from moerl.trainer.logprobs import vocab_parallel_logprobs
    from moerl.trainer.model import build_gpt_model
    from moerl.trainer.routing_replay import RoutingReplay

    model = build_gpt_model(arch, layout, bf16=args.bf16)
    load_hf_weights(model, args.hf, arch, layout)
    model.eval()
    replay = RoutingReplay(arch, layout, tp_group=groups.tp)
    batch, seq = ids_BS.shape
    device = next(model.parameters()).device  # CUDA with Transformer Engine specs on a GPU
    ids_BS = ids_BS.to(device)
    pos_BS = torch.arange(seq, device=device).expand(batch, seq)
    with torch.no_grad(), replay.record(batch_size=batch, seq_len=seq) as recorded:
        logits_BSV = model(ids_BS, pos_BS, attention_mask=None)
        logits_NV = logits_BSV[:, :-1].reshape(-1, logits_BSV.shape[-1])
        logp_N = vocab_parallel_logprobs(logits_NV, ids_BS[:, 1:].reshape(-1), tp_group=groups.tp,
                                         vocab_size=arch.vocab_size)
    return logp_N.view(batch, seq - 1).float().cpu(), recorded.routes_BTLK.cpu(), device


def hf_side(args, arch, ids_BS, device):
    """HF log-probs [B, S-1] and the HF routers' top-k [B, S, L, K], on ``device``."""
    from transformers import AutoModelForCausalLM

    from moerl.families import family_of

    model = AutoModelForCausalLM.from_pretrained(
        args.hf, dtype=torch.bfloat16 if args.bf16 else torch.float32,
        attn_implementation="eager").to(device)
    model.eval()
    ids_BS = ids_BS.to(device)
    layers = model.model.layers
    topk = {}

    def capture(layer_id):
        def hook(module, inputs, output):
            # transformers >= 5 routers return (logits, weights, indices); older ones are a
            # Linear returning logits, whose top-k over the softmax is the top-k of the logits.
            if isinstance(output, tuple) and len(output) == 3:
                topk[layer_id] = output[2]
            else:
                logits = output[0] if isinstance(output, tuple) else output
                topk[layer_id] = logits.topk(arch.top_k, dim=-1).indices
        return hook

    handles = []
    for layer_id in arch.moe_layer_ids:
        block = getattr(layers[layer_id], family_of(arch).moe_module)
        handles.append(block.gate.register_forward_hook(capture(layer_id)))
    with torch.no_grad():
        logits_BSV = model(input_ids=ids_BS).logits.float()
    for handle in handles:
        handle.remove()
    logp_BS = torch.log_softmax(logits_BSV[:, :-1], dim=-1).gather(
        -1, ids_BS[:, 1:, None]).squeeze(-1)
    batch, seq = ids_BS.shape
    routes_BSLK = torch.stack([topk[i].reshape(batch, seq, arch.top_k)
                               for i in arch.moe_layer_ids], dim=2)
    return logp_BS.float().cpu(), routes_BSLK.cpu()


def input_ids(args, vocab_size: int) -> torch.Tensor:
    """``[B, S]``: the ``--ids`` file, or a seeded uniform random batch."""
    if args.ids:
        rows = json.loads(open(args.ids).read())
        if not rows or len({len(r) for r in rows}) != 1:
            raise SystemExit(f"--ids {args.ids}: needs equal-length, non-empty token-id lists")
        ids_BS = torch.tensor(rows, dtype=torch.long)
        if int(ids_BS.min()) < 0 or int(ids_BS.max()) >= vocab_size:
            raise SystemExit(f"--ids {args.ids}: token ids must lie in [0, {vocab_size})")
    else:
        gen = torch.Generator().manual_seed(args.seed)
        ids_BS = torch.randint(0, vocab_size, (args.batch, args.seq), generator=gen)
    seq = ids_BS.shape[1]
    if seq % args.tp or seq < 2:
        raise SystemExit(f"sequence length {seq} must be >= 2 and a multiple of --tp={args.tp} "
                         "(sequence parallelism)")
    return ids_BS


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    from transformers import AutoConfig

    from moerl.trainer.model import architecture_from_hf
    from moerl.trainer.parallel import destroy_parallel, init_parallel
    from moerl.trainer.routing_replay import routing_agreement

    arch = architecture_from_hf(AutoConfig.from_pretrained(args.hf))
    ids_BS = input_ids(args, arch.vocab_size)
    args.batch, args.seq = ids_BS.shape
    layout, groups = init_parallel(tp=args.tp, ep=args.ep, etp=args.etp, seed=args.seed)
    try:
        logp_BS, routes_BSLK, device = trainer_side(args, arch, layout, groups, ids_BS)
        if layout.rank == 0 and args.dump:
            torch.save({"logp_BS": logp_BS, "routes_BSLK": routes_BSLK}, args.dump)
        if layout.rank == 0:
            hf_logp_BS, hf_routes_BSLK = hf_side(args, arch, ids_BS, device)
            diff = (logp_BS - hf_logp_BS).abs()
            agreement = routing_agreement(routes_BSLK, hf_routes_BSLK.to(routes_BSLK.dtype),
                                          torch.ones(args.batch, args.seq, dtype=torch.bool))
            print(json.dumps({
                "max_abs_logp_diff": diff.max().item(), "mean_abs_logp_diff": diff.mean().item(),
                "route_agreement": agreement["route_agreement"].item(),
                "token_route_mismatch": agreement["token_route_mismatch"].item(),
                "world": layout.world, "tp": layout.tp, "ep": layout.ep, "etp": layout.etp,
                "dp": layout.dp, "batch": args.batch, "seq": args.seq,
                "num_moe_layers": len(arch.moe_layer_ids),
                "dtype": "bfloat16" if args.bf16 else "float32", "device": str(device)}),
                flush=True)
    finally:
        destroy_parallel()
    return 0


if __name__ == "__main__":
    sys.exit(main())
