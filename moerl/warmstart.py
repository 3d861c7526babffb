"""Warm start: supervised training of a tiny Qwen3-MoE on the arithmetic task, saved as HF.

The task is the arithmetic one (``--task arithmetic``) or its step-by-step version (``--task
chain``, :mod:`moerl.tasks.chain`). The saved ``warmstart.json`` also records how fragile the
checkpoint's routing is (:func:`route_fragility`): the fraction of answer tokens whose top-k
experts differ in at least one MoE layer between a bf16 and an fp32 forward of the same weights,
the step-0 mismatch a bf16 engine will show against the fp32 trainer.

RL needs a policy that is right part of the time (a group whose rewards are all 0 carries no
signal). This trains a randomly initialised tiny model (``moerl.tiny_model``) with teacher forcing
on ``prompt + answer + <eos>`` (loss on the answer tokens only) and stops as soon as greedy
accuracy on the task's evaluation set reaches ``--target-accuracy``, so RL starts from a weak but
non-trivial policy. It trains the Hugging Face implementation directly (one CPU process, a few
minutes); the result is an ordinary HF checkpoint that both the Megatron trainer and the rollout
server load.

    python -m moerl.warmstart --out runs/tiny_warmstart/hf
    python -m moerl.warmstart --out runs/deep_chain/hf --task chain --variant deep_moe

The default model is the all-MoE ``tiny_moe`` variant, so the main job's checkpoint is one a real
SGLang 0.5.23 server can serve (it builds every Qwen3-MoE layer as MoE; see ``moerl.tiny_model``).
"""

from __future__ import annotations

import argparse
import json
import random
import time
from pathlib import Path

import torch

from moerl.tasks.arithmetic import EOS_ID, PAD_ID, ArithmeticTask
from moerl.tasks.chain import ChainArithmeticTask
from moerl.tiny_model import TINY_VARIANTS, create_tiny_hf_model

SftTask = ArithmeticTask  # ChainArithmeticTask is one too
DEFAULT_VARIANT = "tiny_moe"


@torch.no_grad()
def greedy_accuracy(model, task: SftTask, prompts, *, max_new_tokens: int) -> float:
    """Fraction of prompts whose greedy completion the verifier accepts (batched, KV cache)."""
    width = max(len(p.ids) for p in prompts)
    ids = torch.tensor([[PAD_ID] * (width - len(p.ids)) + list(p.ids) for p in prompts])
    attention = (torch.arange(width) >= torch.tensor(
        [width - len(p.ids) for p in prompts])[:, None]).long()
    out = model.generate(input_ids=ids, attention_mask=attention, max_new_tokens=max_new_tokens,
                         do_sample=False, eos_token_id=EOS_ID, pad_token_id=PAD_ID)
    responses = out[:, width:].tolist()
    return sum(task.reward(p, r) for p, r in zip(prompts, responses)) / len(prompts)


def warm_start(out_dir: str | Path, *, task: SftTask, target_accuracy: float = 0.35,
               max_steps: int = 3000, batch_size: int = 64, lr: float = 3e-3, seed: int = 0,
               eval_every: int = 50, max_new_tokens: int = 8, variant: str = DEFAULT_VARIANT,
               log=print) -> dict:
    """Train until greedy eval accuracy >= target_accuracy (or max_steps); save HF; return stats.

    ``variant`` names a model size of :data:`moerl.tiny_model.TINY_VARIANTS`.
    """
    from transformers import AutoModelForCausalLM

    out_dir = Path(out_dir)
    init_dir = out_dir.with_name(out_dir.name + ".init")
    if variant not in TINY_VARIANTS:
        raise ValueError(f"unknown variant {variant!r}; choose one of {sorted(TINY_VARIANTS)}")
    create_tiny_hf_model(init_dir, seed=seed, **TINY_VARIANTS[variant])
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_pretrained(init_dir, dtype=torch.float32)
    model.generation_config.pad_token_id = PAD_ID
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    rng = random.Random(seed)
    eval_prompts = task.eval_set()
    accuracy, step, started = 0.0, 0, time.time()
    for step in range(1, max_steps + 1):
        prompts = task.prompts(rng.randrange(1 << 30), batch_size)
        rows = [task.sft_text(p) for p in prompts]
        width = max(map(len, rows))
        ids = torch.tensor([r + [PAD_ID] * (width - len(r)) for r in rows])
        labels = ids.clone()
        for i, (p, r) in enumerate(zip(prompts, rows)):
            labels[i, :len(p.ids)] = -100  # learn the answer, not the prompt
            labels[i, len(r):] = -100
        model.train()
        loss = model(input_ids=ids, labels=labels).loss
        optimizer.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        if step % eval_every == 0:
            model.eval()
            accuracy = greedy_accuracy(model, task, eval_prompts, max_new_tokens=max_new_tokens)
            log(f"warm start step {step}: loss {loss.item():.3f}, greedy eval accuracy "
                f"{accuracy:.3f} (target {target_accuracy})")
            if accuracy >= target_accuracy:
                break
    model.save_pretrained(out_dir, safe_serialization=True)
    stats = {"steps": step, "eval_accuracy": accuracy, "seconds": round(time.time() - started, 1),
             "target_accuracy": target_accuracy, "variant": variant,
             "route_fragility_bf16": route_fragility(model, task, eval_prompts)}
    (out_dir / "warmstart.json").write_text(json.dumps(stats, indent=2))
    return stats


def _pad_rows(rows: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-padded ids ``[B, T]`` and their attention mask."""
    width = max(map(len, rows))
    ids = torch.tensor([r + [PAD_ID] * (width - len(r)) for r in rows])
    mask = torch.tensor([[1] * len(r) + [0] * (width - len(r)) for r in rows])
    return ids, mask


@torch.no_grad()
def route_fragility(model, task: SftTask, prompts, *, dtype=torch.bfloat16) -> dict:
    """How differently a ``dtype`` forward of the same weights routes and predicts than fp32.

    Teacher-forced on ``prompt + answer + <eos>``; a token's routing is the top-k expert set of
    every MoE layer at the position that predicts it (as the trainer's routing telemetry counts
    it). Returns ``token_route_mismatch`` (answer tokens differing in at least one MoE layer),
    ``route_agreement`` (agreeing (token, layer) pairs), the number of tokens counted, and the
    exact KL(fp32 || ``dtype``) of the next-token distributions over the whole vocabulary: its
    mean over the answer tokens (``kl``) and over those routed identically / differently
    (``kl_same``, ``kl_rerouted``; NaN for an empty group).
    """
    from moerl.trainer.routing_replay import routing_agreement

    rows = [task.sft_text(p) for p in prompts]
    ids, attention = _pad_rows(rows)
    answer_BT = torch.zeros_like(ids, dtype=torch.bool)
    for i, (p, r) in enumerate(zip(prompts, rows)):
        answer_BT[i, len(p.ids) - 1:len(r) - 1] = True  # positions predicting answer tokens
    top_k = model.config.num_experts_per_tok

    def forward(m):
        out = m(input_ids=ids, attention_mask=attention, output_router_logits=True)
        per_layer = [layer.float().topk(top_k, dim=-1).indices.view(*ids.shape, top_k)
                     for layer in out.router_logits if layer is not None]
        # [B, T, L_moe, K], [B, T, V]
        return torch.stack(per_layer, dim=2), out.logits.double().log_softmax(-1)

    model.eval()
    exact, exact_logp = forward(model.float())
    low, low_logp = forward(_copy_in(model, dtype))
    agreement = routing_agreement(exact, low, answer_BT)
    kl_BT = (exact_logp.exp() * (exact_logp - low_logp)).sum(-1)
    same_BT = (exact.sort(-1).values == low.sort(-1).values).all(-1).all(-1)

    def mean_kl(where_BT):
        picked = kl_BT[where_BT & answer_BT]
        return float(f"{float(picked.mean()):.6g}") if picked.numel() else float("nan")

    return {"dtype": str(dtype).removeprefix("torch."), "tokens": int(answer_BT.sum()),
            "token_route_mismatch": round(float(agreement["token_route_mismatch"]), 4),
            "route_agreement": round(float(agreement["route_agreement"]), 4),
            "kl": mean_kl(torch.ones_like(answer_BT)), "kl_same": mean_kl(same_BT),
            "kl_rerouted": mean_kl(~same_BT)}


def _copy_in(model, dtype):
    import copy

    return copy.deepcopy(model).to(dtype)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", required=True, help="output HF checkpoint directory")
    parser.add_argument("--target-accuracy", type=float, default=0.35)
    parser.add_argument("--max-steps", type=int, default=3000)
    parser.add_argument("--task", default="arithmetic", choices=["arithmetic", "chain"],
                        help="arithmetic: a+b= answered with the sum; chain: a+b+c+...= answered "
                             "step by step with every partial sum (moerl.tasks.chain)")
    parser.add_argument("--max-operand", type=int, default=9)
    parser.add_argument("--num-terms", type=int, default=2)
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--task-seed", type=int, default=7)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--variant", default=DEFAULT_VARIANT, choices=sorted(TINY_VARIANTS),
                        help="model size (moerl.tiny_model.TINY_VARIANTS)")
    args = parser.parse_args(argv)
    kind = ChainArithmeticTask if args.task == "chain" else ArithmeticTask
    task = kind(max_operand=args.max_operand, num_terms=args.num_terms, seed=args.task_seed)
    # A chain answer is tens of tokens: greedy evaluation must be allowed to write all of them.
    max_new = task.max_response_tokens() + 2 if args.task == "chain" else 8
    stats = warm_start(args.out, task=task, target_accuracy=args.target_accuracy,
                       max_steps=args.max_steps, seed=args.seed, variant=args.variant,
                       lr=args.lr, max_new_tokens=max_new)
    print(json.dumps(stats))


if __name__ == "__main__":
    main()
