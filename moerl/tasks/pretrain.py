"""Pretraining data for PPO-ptx (InstructGPT's language-model term during RL).

JSONL, one sample per line: ``{"input_ids": [...]}`` or ``{"text": "..."}`` (tokenised with the
task's tokenizer). Every token after the first is a target. Batches are a deterministic
function of ``(seed, step)``, so a resumed run trains on the same pretraining samples.
"""

from __future__ import annotations

import random

import torch

from moerl.batch import RolloutBatch, Sample, pack_samples
from moerl.tasks.base import Tokenizer
from moerl.tasks.math_jsonl import read_jsonl


class PretrainData:
    def __init__(self, path: str, *, tokenizer: Tokenizer, max_len: int, seed: int):
        rows = read_jsonl(path, ())
        self.sequences: list[list[int]] = []
        for i, row in enumerate(rows, 1):
            if "input_ids" in row:
                ids = [int(t) for t in row["input_ids"]]
            elif "text" in row:
                ids = tokenizer.encode(row["text"])
            else:
                raise ValueError(f"{path}:{i}: a pretraining sample needs input_ids or text")
            if len(ids) < 2:
                raise ValueError(f"{path}:{i}: a pretraining sample needs at least 2 tokens")
            if max(ids) >= tokenizer.vocab_size or min(ids) < 0:
                raise ValueError(f"{path}:{i}: token ids outside [0, {tokenizer.vocab_size})")
            self.sequences.append(ids[:max_len])
        self.pad_id, self.seed = tokenizer.pad_id, seed

    def batch(self, step: int, count: int, *, pad_multiple: int) -> RolloutBatch:
        """``count`` samples as a batch whose loss mask covers every predicted token."""
        picks = random.Random(f"{self.seed}/ptx/{step}").choices(self.sequences, k=count)
        samples = [Sample(group_index=i, sample_index=0, prompt_ids=ids[:1],
                          response_ids=ids[1:], rollout_logprobs_R=torch.zeros(len(ids) - 1),
                          full_logprobs_R=torch.zeros(len(ids) - 1), finish_reason="stop")
                   for i, ids in enumerate(picks)]
        return pack_samples(samples, pad_id=self.pad_id, pad_multiple=pad_multiple)
