"""The user's side of the bring-your-own end-to-end test, as a user would write it: a two-turn
environment (custom rollout) and an import-path reward. Importable as ``byo.toy_env`` with
``tests/`` on PYTHONPATH."""

from __future__ import annotations

FEEDBACK = "<|im_end|> <|im_start|> tool try again <|im_end|> <|im_start|> assistant"


async def two_turns(prompt, session):
    """The policy answers; the environment says "try again"; the policy answers once more."""
    first = await session.generate(max_new_tokens=max(1, session.remaining // 3))
    feedback = session.tokenizer.encode(FEEDBACK)
    if session.remaining <= len(feedback):
        return {"turns": 1}
    session.append(feedback)
    await session.generate()
    return {"turns": 2, "first_turn_tokens": len(first.ids)}


def length_reward(prompt, response, *, response_ids, answer, metadata):
    """A dense toy reward, so that groups differ: shorter responses score higher; the extras
    are logged."""
    return {"score": 1.0 / (1.0 + len(response_ids)), "turns": metadata.get("turns", 0)}


def flaky_reward(prompt, response, *, response_ids, answer, metadata):
    """Raises on some samples, as user code does."""
    if response_ids[0] % 2:
        raise ValueError("cannot score a response that starts with an odd token id")
    return 1.0


async def broken_env(prompt, session):
    """An environment with a bug on its second sample."""
    await session.generate(max_new_tokens=2)
    if session.sample_index == 1:
        raise KeyError("tool 'calculator' not found")
    return None
