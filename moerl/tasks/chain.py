"""Multi-step arithmetic that writes its intermediate results: responses of tens of tokens.

A prompt is ``<bos>a+b+c+d=`` and the only correct response is the left-to-right chain of partial
sums, each step written out, followed by ``<eos>``::

    12+7+25+3=   ->   12+7=19 19+25=44 44+3=47<eos>

The verifier is exact: every step (operands copied from the prompt, the running sum carried
from the previous step, the sum itself) must be right, so one wrong token anywhere scores 0.
With 4 terms of 0..30 a response is about 25 tokens, where the arithmetic task's is 2-3: long
enough that token-level and sequence-level importance ratios (GRPO vs GSPO) differ in earnest.
Same character tokenizer and 64-id vocabulary as :mod:`moerl.tasks.arithmetic`.
"""

from __future__ import annotations

import random

from moerl.tasks.arithmetic import BOS_ID, EOS_ID, CharTokenizer
from moerl.tasks.base import Prompt


def chain_text(terms: list[int]) -> str:
    """The canonical worked answer: ``a+b=s1 s1+c=s2 ...`` (no trailing space)."""
    steps, total = [], terms[0]
    for term in terms[1:]:
        steps.append(f"{total}+{term}={total + term}")
        total += term
    return " ".join(steps)


class ChainArithmeticTask:
    """Sums of ``num_terms`` integers in ``0..max_operand``, answered step by step."""

    def __init__(self, *, max_operand: int = 30, num_terms: int = 4, eval_size: int = 64,
                 seed: int = 7):
        if max_operand < 1 or num_terms < 2:
            raise ValueError("task.max_operand must be >= 1 and task.num_terms >= 2")
        self.tokenizer = CharTokenizer()
        self.max_operand = max_operand
        self.num_terms = num_terms
        self.eval_size = eval_size
        self.seed = seed

    def max_response_tokens(self) -> int:
        """The longest correct response, ``<eos>`` included (for rollout.max_new_tokens)."""
        return len(chain_text([self.max_operand] * self.num_terms)) + 1

    def _problem(self, rng: random.Random) -> Prompt:
        terms = [rng.randint(0, self.max_operand) for _ in range(self.num_terms)]
        text = "+".join(map(str, terms)) + "="
        ids = (BOS_ID, *self.tokenizer.encode(text))
        return Prompt(ids=ids, text=text, answer=chain_text(terms))

    def prompts(self, step: int, count: int) -> list[Prompt]:
        rng = random.Random(f"{self.seed}/chain/{step}")
        return [self._problem(rng) for _ in range(count)]

    def eval_set(self) -> list[Prompt]:
        rng = random.Random(f"{self.seed}/chain-eval")
        return [self._problem(rng) for _ in range(self.eval_size)]

    def reward(self, prompt: Prompt, response_ids: list[int]) -> float:
        if EOS_ID not in response_ids:
            return 0.0  # ran out of budget: no committed answer
        return float(self.tokenizer.decode(response_ids) == prompt.answer)

    def sft_text(self, prompt: Prompt) -> list[int]:
        """Prompt + worked answer + eos, for the warm start's supervised training."""
        return [*prompt.ids, *self.tokenizer.encode(prompt.answer), EOS_ID]
