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

from moerl.tasks.arithmetic import ArithmeticTask


def chain_text(terms: list[int]) -> str:
    """The canonical worked answer: ``a+b=s1 s1+c=s2 ...`` (no trailing space)."""
    steps, total = [], terms[0]
    for term in terms[1:]:
        steps.append(f"{total}+{term}={total + term}")
        total += term
    return " ".join(steps)


class ChainArithmeticTask(ArithmeticTask):
    """Sums of ``num_terms`` integers in ``0..max_operand``, answered step by step: the
    arithmetic task with :func:`chain_text` as the answer and random streams of its own."""

    train_stream = "chain"
    eval_stream = "chain-eval"
    answer = staticmethod(chain_text)

    def __init__(self, *, max_operand: int = 30, num_terms: int = 4, eval_size: int = 64,
                 seed: int = 7):
        super().__init__(max_operand=max_operand, num_terms=num_terms, eval_size=eval_size,
                         seed=seed)

    def max_response_tokens(self) -> int:
        """The longest correct response, ``<eos>`` included (for rollout.max_new_tokens)."""
        return len(chain_text([self.max_operand] * self.num_terms)) + 1
