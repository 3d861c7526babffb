"""Offline DPO (Rafailov et al. 2023) with the Megatron actor; the initial policy is the reference.

Data: JSONL of preference pairs, either token ids ``{"prompt_ids", "chosen_ids",
"rejected_ids"}`` or text ``{"prompt", "chosen", "rejected"}`` (tokenised with the model's HF
tokenizer). ``python -m moerl.dpo --make-arithmetic-pairs FILE`` writes id pairs for the tiny
arithmetic model: the correct sum as chosen, a wrong one as rejected.

Each step trains on ``rollout.prompts_per_step`` pairs (the chosen and rejected responses of a
pair are adjacent rows and always share a micro-batch); the loss is the mean over pairs.
The last ``task.eval_size`` pairs are held out; ``eval/reward_accuracy`` is the fraction of them
whose implicit reward ranks chosen above rejected.
"""

from __future__ import annotations

import argparse
import json
import random
from pathlib import Path

import torch

from moerl.algos import dpo_loss, sequence_logprobs
from moerl.batch import RolloutBatch, Sample, pack_samples
from moerl.tasks.math_jsonl import HFTokenizer, read_jsonl


def load_pairs(path: str, model_dir: str) -> list[tuple[list[int], list[int], list[int]]]:
    rows = read_jsonl(path, ())
    tokenizer = None
    pairs = []
    for i, row in enumerate(rows, 1):
        if {"prompt_ids", "chosen_ids", "rejected_ids"} <= row.keys():
            pairs.append((row["prompt_ids"], row["chosen_ids"], row["rejected_ids"]))
        elif {"prompt", "chosen", "rejected"} <= row.keys():
            tokenizer = tokenizer or HFTokenizer(model_dir)
            pairs.append((tokenizer.prompt_ids(row["prompt"]), tokenizer.encode(row["chosen"]),
                          tokenizer.encode(row["rejected"])))
        else:
            raise ValueError(f"{path}:{i}: a pair needs prompt_ids/chosen_ids/rejected_ids or "
                             f"prompt/chosen/rejected")
    return pairs


def pairs_to_batch(pairs, *, pad_id: int, pad_multiple: int) -> RolloutBatch:
    """Rows 2i (chosen) and 2i+1 (rejected) of pair i."""
    samples = []
    for g, (prompt, chosen, rejected) in enumerate(pairs):
        for k, response in enumerate((chosen, rejected)):
            samples.append(Sample(group_index=g, sample_index=k, prompt_ids=list(prompt),
                                  response_ids=list(response),
                                  rollout_logprobs_R=torch.zeros(len(response)),
                                  full_logprobs_R=torch.zeros(len(response)),
                                  finish_reason="stop"))
    return pack_samples(samples, pad_id=pad_id, pad_multiple=pad_multiple)


def _dpo_terms(mb: RolloutBatch, logprobs_BT: torch.Tensor, beta: float):
    seq_B = sequence_logprobs(logprobs_BT, mb.response_mask_BT)
    ref_B = sequence_logprobs(mb.ref_logprobs_BT, mb.response_mask_BT)
    return dpo_loss(seq_B[0::2], seq_B[1::2], ref_B[0::2], ref_B[1::2], beta=beta)


def train_dpo(run, start_step: int) -> None:
    from moerl.telemetry import StageTimer

    cfg = run.config
    pairs = load_pairs(cfg.task.path, cfg.model.hf_path)
    if len(pairs) <= cfg.task.eval_size:
        raise ValueError(f"{cfg.task.path} has {len(pairs)} pairs, not more than "
                         f"task.eval_size={cfg.task.eval_size}")
    train_pairs, eval_pairs = pairs[:-cfg.task.eval_size], pairs[-cfg.task.eval_size:]
    per_step = cfg.rollout.prompts_per_step
    settings = run.settings
    if settings.micro_batch_size % 2:
        raise ValueError("DPO needs an even training.micro_batch_size (pairs stay together)")
    beta = cfg.algorithm.dpo_beta
    pad = dict(pad_id=run.pad_id, pad_multiple=run.layout.tp)
    eval_batch = pairs_to_batch(eval_pairs, **pad)
    run.actor.compute_ref_logprobs(eval_batch, torch.arange(eval_batch.batch_size), settings)
    for step in range(start_step, cfg.training.steps):
        timer = StageTimer()
        order = random.Random(f"{cfg.training.seed}/dpo/{step}").sample(range(len(train_pairs)),
                                                                         per_step)
        batch = pairs_to_batch([train_pairs[i] for i in order], **pad)
        rows = _dp_pair_rows(run, batch.batch_size)
        with timer("reference"):
            run.actor.compute_ref_logprobs(batch, rows, settings)
        num_pairs = batch.batch_size // 2

        def loss_fn(mb, logprobs_BT, _entropy):
            loss_P, metrics = _dpo_terms(mb, logprobs_BT, beta)
            return loss_P.sum() / num_pairs, metrics

        with timer("update"):
            result, metrics = run.actor.train_step(batch, rows, settings, loss_fn,
                                                   with_entropy=False, mask_on=False)
        metrics = {f"dpo/{k}": v.item() for k, v in metrics.items()}
        metrics.update(grad_norm=result.grad_norm, skipped=float(not result.ok))
        if cfg.training.eval_every and (step + 1) % cfg.training.eval_every == 0:
            metrics["eval/reward_accuracy"] = _eval_accuracy(run, eval_batch, settings, beta)
        run.telemetry.log(step, {**run.dp.reduce_metrics(metrics), **timer.metrics()})
        if run.checkpoints.due(step + 1):
            run.checkpoints.save(step + 1, run)


def _dp_pair_rows(run, num_rows: int) -> torch.Tensor:
    pairs = run.dp.owned_rows(num_rows // 2)
    return torch.stack([2 * pairs, 2 * pairs + 1], dim=1).reshape(-1)


@torch.no_grad()
def _eval_accuracy(run, eval_batch: RolloutBatch, settings, beta: float) -> float:
    rows = torch.arange(eval_batch.batch_size)
    eval_batch.old_logprobs_BT = None
    run.actor.compute_old_logprobs(eval_batch, rows, settings)
    _, metrics = _dpo_terms(eval_batch, eval_batch.old_logprobs_BT, beta)
    return metrics["reward_accuracy"].item()


def make_arithmetic_pairs(path: str | Path, *, count: int, max_operand: int, seed: int) -> None:
    """Preference pairs for the arithmetic task: correct sum (chosen) vs. a near miss."""
    from moerl.tasks.arithmetic import EOS_ID, ArithmeticTask

    task = ArithmeticTask(max_operand=max_operand, seed=seed)
    rng = random.Random(seed)
    tok = task.tokenizer
    lines = []
    for prompt in task.prompts(0, count):
        answer = int(prompt.answer)
        wrong = answer + rng.choice([-2, -1, 1, 2, 10])
        wrong = wrong if wrong >= 0 else answer + 1
        lines.append(json.dumps({"prompt_ids": list(prompt.ids),
                                 "chosen_ids": tok.encode(str(answer)) + [EOS_ID],
                                 "rejected_ids": tok.encode(str(wrong)) + [EOS_ID]}))
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text("\n".join(lines) + "\n")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m moerl.dpo", description=__doc__.split("\n")[0])
    parser.add_argument("--make-arithmetic-pairs", metavar="FILE", required=True,
                        help="write arithmetic preference pairs (token ids) to FILE")
    parser.add_argument("--count", type=int, default=2048)
    parser.add_argument("--max-operand", type=int, default=30)
    parser.add_argument("--seed", type=int, default=11)
    args = parser.parse_args(argv)
    make_arithmetic_pairs(args.make_arithmetic_pairs, count=args.count,
                          max_operand=args.max_operand, seed=args.seed)


if __name__ == "__main__":
    main()
