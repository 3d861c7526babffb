"""What a task gives the RL loop: a tokenizer, a prompt stream, a fixed evaluation set, a reward."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol


@dataclass(frozen=True)
class Prompt:
    """One problem: its token ids and what the verifier needs to score a response."""

    ids: tuple[int, ...]
    text: str
    answer: str
    meta: dict = field(default_factory=dict, compare=False)


class Tokenizer(Protocol):
    vocab_size: int
    eos_id: int
    pad_id: int

    def encode(self, text: str) -> list[int]: ...

    def decode(self, ids: list[int]) -> str: ...


class Task(Protocol):
    tokenizer: Tokenizer

    def prompts(self, step: int, count: int) -> list[Prompt]:
        """The prompts of RL step ``step``: a deterministic function of (seed, step), so a resumed
        run sees exactly the prompts an uninterrupted one would have."""
        ...

    def eval_set(self) -> list[Prompt]:
        """A fixed evaluation set, disjoint from nothing in particular but identical every call."""
        ...

    def reward(self, prompt: Prompt, response_ids: list[int]) -> float:
        """Score one response (1.0 correct, 0.0 otherwise for the verifiable tasks)."""
        ...
