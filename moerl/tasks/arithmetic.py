"""Synthetic arithmetic: sums of small integers with an exact verifier and a character tokenizer.

The CPU default task. A prompt is ``<bos>a+b=`` and a correct response is the decimal sum
followed by ``<eos>``; anything else scores 0. The vocabulary is 64 ids (the tiny model's), of
which the first three are the special tokens ``<pad>=0, <bos>=1, <eos>=2``: unused ids exist
on purpose, so a sampler's kept set and the model's full vocabulary differ as they do in real LMs.
"""

from __future__ import annotations

import random

from moerl.tasks.base import Prompt

_CHARS = "0123456789+-*= ?"
PAD_ID, BOS_ID, EOS_ID = 0, 1, 2
_OFFSET = 3


class CharTokenizer:
    """Character-level tokenizer of the arithmetic task (ids 3.. are the characters of _CHARS)."""

    vocab_size = 64
    pad_id = PAD_ID
    bos_id = BOS_ID
    eos_id = EOS_ID

    def encode(self, text: str) -> list[int]:
        unknown = sorted(set(text) - set(_CHARS))
        if unknown:
            raise ValueError(f"characters {unknown} are not in the arithmetic vocabulary "
                             f"{_CHARS!r}")
        return [_OFFSET + _CHARS.index(c) for c in text]

    def decode(self, ids: list[int]) -> str:
        out = []
        for i in ids:
            if i == EOS_ID:
                break
            if _OFFSET <= i < _OFFSET + len(_CHARS):
                out.append(_CHARS[i - _OFFSET])
            elif i not in (PAD_ID, BOS_ID):
                out.append("?")  # an id the task never uses: visible, never correct
        return "".join(out)


class ArithmeticTask:
    """Sums of ``num_terms`` integers in ``0..max_operand``."""

    # Names of the random streams of training and evaluation problems (subclasses keep theirs
    # apart from these), and the one correct answer to terms.
    train_stream = "train"
    eval_stream = "eval"

    @staticmethod
    def answer(terms: list[int]) -> str:
        return str(sum(terms))

    def __init__(self, *, max_operand: int = 9, num_terms: int = 2, eval_size: int = 64,
                 seed: int = 7):
        if max_operand < 1 or num_terms < 2:
            raise ValueError("task.max_operand must be >= 1 and task.num_terms >= 2")
        self.tokenizer = CharTokenizer()
        self.max_operand = max_operand
        self.num_terms = num_terms
        self.eval_size = eval_size
        self.seed = seed

    def _problem(self, rng: random.Random) -> Prompt:
        terms = [rng.randint(0, self.max_operand) for _ in range(self.num_terms)]
        text = "+".join(map(str, terms)) + "="
        ids = (BOS_ID, *self.tokenizer.encode(text))
        return Prompt(ids=ids, text=text, answer=self.answer(terms))

    def prompts(self, step: int, count: int) -> list[Prompt]:
        rng = random.Random(f"{self.seed}/{self.train_stream}/{step}")
        return [self._problem(rng) for _ in range(count)]

    def eval_set(self) -> list[Prompt]:
        rng = random.Random(f"{self.seed}/{self.eval_stream}")
        return [self._problem(rng) for _ in range(self.eval_size)]

    def reward(self, prompt: Prompt, response_ids: list[int]) -> float:
        if EOS_ID not in response_ids:
            return 0.0  # ran out of budget: no committed answer
        return float(self.tokenizer.decode(response_ids) == prompt.answer)

    def sft_text(self, prompt: Prompt) -> list[int]:
        """Prompt + correct answer + eos, for the warm start's supervised training."""
        return [*prompt.ids, *self.tokenizer.encode(prompt.answer), EOS_ID]
