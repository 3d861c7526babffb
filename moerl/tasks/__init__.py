"""Tasks: prompt streams with verifiers (RL) and preference pairs (DPO)."""

from __future__ import annotations

import dataclasses
import logging
from typing import TYPE_CHECKING

from moerl.tasks.arithmetic import ArithmeticTask
from moerl.tasks.base import Prompt, Task, Tokenizer
from moerl.tasks.chain import ChainArithmeticTask

if TYPE_CHECKING:
    from moerl.config import TaskConfig

__all__ = ["ArithmeticTask", "ChainArithmeticTask", "Prompt", "Task", "Tokenizer", "build_task"]

log = logging.getLogger("moerl.tasks")
# Keys only task.name=dataset reads.
_DATASET_KEYS = ("split", "eval_split", "prompt_field", "answer_field", "system_prompt",
                 "max_prompt_tokens")


def build_task(t: TaskConfig, *, model_dir: str, max_prompt_tokens: int) -> Task:
    """The task named by ``task.name`` (model_dir provides the HF tokenizer of data tasks;
    ``max_prompt_tokens`` is the limit used when ``task.max_prompt_tokens`` is 0)."""
    defaults = {f.name: f.default for f in dataclasses.fields(t)}
    ignored = [k for k in _DATASET_KEYS if getattr(t, k) != defaults[k]]
    if t.name != "dataset" and ignored:
        log.warning("task.%s only apply to task.name=dataset; task.name=%s ignores them",
                    ", task.".join(ignored), t.name)
    if t.name == "arithmetic":
        return ArithmeticTask(max_operand=t.max_operand, num_terms=t.num_terms,
                              eval_size=t.eval_size, seed=t.seed)
    if t.name == "chain":
        return ChainArithmeticTask(max_operand=t.max_operand, num_terms=t.num_terms,
                                   eval_size=t.eval_size, seed=t.seed)
    from moerl.tasks.math_jsonl import HFTokenizer

    if t.name == "jsonl_math":
        from moerl.tasks.math_jsonl import MathJsonlTask

        return MathJsonlTask(path=t.path, tokenizer=HFTokenizer(model_dir),
                             eval_path=t.eval_path, eval_size=t.eval_size, seed=t.seed)
    if t.name == "dataset":
        from moerl.tasks.dataset import DatasetTask

        return DatasetTask(path=t.path, tokenizer=HFTokenizer(model_dir), eval_path=t.eval_path,
                           split=t.split, eval_split=t.eval_split, prompt_field=t.prompt_field,
                           answer_field=t.answer_field, system_prompt=t.system_prompt,
                           max_prompt_tokens=t.max_prompt_tokens or max_prompt_tokens,
                           eval_size=t.eval_size, seed=t.seed)
    raise ValueError(f"task.name={t.name!r} is not an RL task; choose arithmetic, chain, "
                     f"jsonl_math or dataset")
