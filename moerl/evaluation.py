"""What a user reads about the policy: evaluation metrics and per-step sample dumps.

- :func:`eval_metrics`: greedy accuracy (the mean score of one greedy sample per prompt), and,
  with ``k`` samples per prompt at the rollout temperature, ``pass@k`` (the fraction of prompts
  with at least one sample scoring ``>= threshold``; with exactly k samples drawn this is the
  unbiased estimator of Chen et al. 2021 at n = k) and ``mean@k`` (the mean score of all k*N
  samples).
- :func:`dump_samples`: ``samples/step_NNNNNN.jsonl``, one line per trained sample: prompt and
  response text, reward, advantage, and the per-sample train/rollout mismatch, so a user can read
  what the policy does. A resumed step rewrites its file, so dumps match an uninterrupted run.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from moerl.batch import RolloutBatch, Sample
from moerl.tasks.base import Tokenizer


def eval_metrics(greedy: list[Sample], sampled: list[Sample], *, k: int,
                 threshold: float) -> dict[str, float]:
    """``eval/accuracy`` of the greedy samples; ``eval/pass@k``, ``eval/mean@k`` of ``sampled``
    (``k`` per prompt, grouped by ``group_index``) when there are any."""
    metrics = {"eval/accuracy": sum(s.reward for s in greedy) / len(greedy)}
    if sampled:
        by_prompt: dict[int, list[float]] = {}
        for s in sampled:
            by_prompt.setdefault(s.group_index, []).append(s.reward)
        assert all(len(v) == k for v in by_prompt.values()), "k samples per prompt"
        solved = [any(r >= threshold for r in rewards) for rewards in by_prompt.values()]
        metrics[f"eval/pass@{k}"] = sum(solved) / len(solved)
        metrics[f"eval/mean@{k}"] = sum(s.reward for s in sampled) / len(sampled)
    return metrics


def sample_records(batch: RolloutBatch, tokenizer: Tokenizer) -> list[dict]:
    """One JSON-ready record per sample of a batch whose advantages are computed."""
    mask_BT = batch.response_mask_BT
    counts_B = mask_BT.sum(-1).clamp(min=1)
    out = {}
    if batch.old_logprobs_BT is not None:
        diff_BT = (batch.old_logprobs_BT - batch.rollout_logprobs_BT) * mask_BT
        x_BT = diff_BT.clamp(-20.0, 20.0)
        out["mismatch_abs_mean"] = diff_BT.abs().sum(-1) / counts_B
        out["mismatch_abs_max"] = diff_BT.abs().amax(-1)
        out["mismatch_k3"] = ((torch.expm1(x_BT) - x_BT) * mask_BT).sum(-1) / counts_B
    if batch.advantages_BT is not None:
        out["advantage"] = (batch.advantages_BT * mask_BT).sum(-1) / counts_B
    records = []
    for b in range(batch.batch_size):
        p, r = int(batch.prompt_lengths_B[b]), int(batch.response_lengths_B[b])
        tokens = batch.tokens_BT[b].tolist()
        record = {
            "group": int(batch.group_ids_B[b]), "prompt": tokenizer.decode(tokens[:p]),
            "response": tokenizer.decode(tokens[p:p + r]), "response_tokens": r,
            "policy_tokens": int(mask_BT[b].sum()), "truncated": bool(batch.truncated_B[b]),
            "score": None if batch.scores_B is None else float(batch.scores_B[b]),
            "reward": None if batch.rewards_B is None else float(batch.rewards_B[b])}
        record.update({k: float(v[b]) for k, v in out.items()})
        records.append(record)
    return records


def dump_samples(out_dir: Path, step: int, batch: RolloutBatch, tokenizer: Tokenizer) -> Path:
    """Write ``out_dir/step_NNNNNN.jsonl`` (see the module docstring)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / f"step_{step:06d}.jsonl"
    tmp = path.with_suffix(".tmp")
    tmp.write_text("".join(json.dumps(r) + "\n" for r in sample_records(batch, tokenizer)))
    tmp.replace(path)
    return path
