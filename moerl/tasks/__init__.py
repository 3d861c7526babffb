"""Tasks: prompt streams with verifiers (RL) and preference pairs (DPO)."""

from __future__ import annotations

from moerl.tasks.arithmetic import ArithmeticTask
from moerl.tasks.base import Prompt, Task, Tokenizer

__all__ = ["ArithmeticTask", "Prompt", "Task", "Tokenizer", "build_task"]


def build_task(*, name: str, path: str, eval_path: str, max_operand: int, num_terms: int,
               eval_size: int, seed: int, model_dir: str) -> Task:
    """The task named by ``task.name`` (model_dir provides the HF tokenizer of jsonl tasks)."""
    if name == "arithmetic":
        return ArithmeticTask(max_operand=max_operand, num_terms=num_terms, eval_size=eval_size,
                              seed=seed)
    if name == "jsonl_math":
        from moerl.tasks.math_jsonl import HFTokenizer, MathJsonlTask

        return MathJsonlTask(path=path, tokenizer=HFTokenizer(model_dir), eval_path=eval_path,
                             eval_size=eval_size, seed=seed)
    raise ValueError(f"task.name={name!r} is not an RL task; choose arithmetic or jsonl_math")
