"""Math word problems from a JSONL file, scored by a final-answer verifier.

Each line: ``{"prompt": "...", "answer": "42"}``. The prompt is tokenised with the model's own
Hugging Face tokenizer (its chat template when it has one). The verifier extracts the final answer
from the response: the last ``\\boxed{...}`` if present, else the last number, and compares it
with the reference after normalisation (whitespace, ``$``, thousands separators, trailing
``.0``), numerically when both sides parse as exact fractions (``0.5 == 1/2``).

Deviation from graders such as Math-Verify: no symbolic equivalence (``x^2+2x`` vs ``x(x+2)``);
use a dataset whose answers are numbers or canonical strings.
"""

from __future__ import annotations

import json
import random
import re
from fractions import Fraction
from pathlib import Path

from moerl.tasks.base import Prompt

_NUMBER = re.compile(r"-?\d[\d,]*(?:\.\d+)?(?:/\d+)?|-?\.\d+")


def _boxed(text: str) -> str | None:
    """Content of the last ``\\boxed{...}``, honouring nested braces."""
    start = text.rfind("\\boxed{")
    if start < 0:
        return None
    depth, i = 1, start + len("\\boxed{")
    begin = i
    while i < len(text) and depth:
        depth += {"{": 1, "}": -1}.get(text[i], 0)
        i += 1
    return text[begin:i - 1] if depth == 0 else None


def extract_answer(text: str) -> str | None:
    boxed = _boxed(text)
    if boxed is not None:
        return boxed
    numbers = _NUMBER.findall(text)
    return numbers[-1] if numbers else None


def normalise(answer: str) -> str:
    s = answer.strip().strip("$").replace("\\!", "").replace(" ", "")
    s = re.sub(r"\\(?:text|mathrm)\{([^}]*)\}", r"\1", s)
    s = re.sub(r"(?<=\d),(?=\d{3})", "", s)
    s = re.sub(r"\\[dt]?frac\{([^}]*)\}\{([^}]*)\}", r"\1/\2", s)
    return s.rstrip(".")


def _as_fraction(s: str) -> Fraction | None:
    try:
        return Fraction(s)
    except (ValueError, ZeroDivisionError):
        return None


def answers_match(predicted: str, reference: str) -> bool:
    p, r = normalise(predicted), normalise(reference)
    if p == r:
        return True
    fp, fr = _as_fraction(p), _as_fraction(r)
    return fp is not None and fr is not None and fp == fr


def read_jsonl(path: str | Path, required: tuple[str, ...]) -> list[dict]:
    """Read a JSONL file, raising ValueError with the line number of any bad record."""
    rows = []
    with open(path) as fh:
        for lineno, line in enumerate(fh, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as err:
                raise ValueError(f"{path}:{lineno}: not valid JSON ({err.msg})") from None
            missing = [k for k in required if k not in row]
            if missing:
                raise ValueError(f"{path}:{lineno}: missing field(s) {missing}")
            rows.append(row)
    if not rows:
        raise ValueError(f"{path} holds no records")
    return rows


class HFTokenizer:
    """The model's Hugging Face tokenizer behind moerl's small Tokenizer protocol."""

    def __init__(self, model_dir: str):
        from transformers import AutoTokenizer

        try:
            self._tok = AutoTokenizer.from_pretrained(model_dir)
        except (OSError, ValueError) as err:
            raise ValueError(f"no Hugging Face tokenizer in {model_dir}: {err}") from None
        self.vocab_size = len(self._tok)
        self.eos_id = self._tok.eos_token_id
        self.pad_id = self._tok.pad_token_id if self._tok.pad_token_id is not None else self.eos_id

    def encode(self, text: str) -> list[int]:
        return self._tok.encode(text, add_special_tokens=False)

    def decode(self, ids: list[int]) -> str:
        return self._tok.decode(ids, skip_special_tokens=True)

    def prompt_ids(self, text: str) -> list[int]:
        return self.render([{"role": "user", "content": text}])[1]

    def render(self, messages: list[dict]) -> tuple[str, list[int]]:
        """A conversation as the model sees it: its chat template with a generation prompt when
        it has one (the rendered text already holds the special tokens), else the contents
        joined by blank lines and encoded with the tokenizer's special tokens."""
        if getattr(self._tok, "chat_template", None):
            text = self._tok.apply_chat_template(messages, add_generation_prompt=True,
                                                 tokenize=False)
            return text, self._tok.encode(text, add_special_tokens=False)
        text = "\n\n".join(m["content"] for m in messages)
        return text, self._tok.encode(text)


class MathJsonlTask:
    def __init__(self, *, path: str, tokenizer: HFTokenizer, eval_path: str = "",
                 eval_size: int = 64, seed: int = 7):
        rows = read_jsonl(path, ("prompt", "answer"))
        if eval_path:
            eval_rows = read_jsonl(eval_path, ("prompt", "answer"))
        else:
            if len(rows) <= eval_size:
                raise ValueError(f"{path} has {len(rows)} records: not enough to hold out "
                                 f"task.eval_size={eval_size}; pass task.eval_path")
            rows, eval_rows = rows[:-eval_size], rows[-eval_size:]
        self.tokenizer = tokenizer
        self._train = [self._prompt(r) for r in rows]
        self._eval = [self._prompt(r) for r in eval_rows[:eval_size]]
        self.seed = seed

    def _prompt(self, row: dict) -> Prompt:
        ids = tuple(self.tokenizer.prompt_ids(row["prompt"]))
        return Prompt(ids=ids, text=row["prompt"], answer=str(row["answer"]))

    def prompts(self, step: int, count: int) -> list[Prompt]:
        # Epoch-wise shuffles: every prompt is seen once per epoch, order fixed by (seed, epoch).
        n = len(self._train)
        out = []
        for k in range(step * count, (step + 1) * count):
            epoch, pos = divmod(k, n)
            order = list(range(n))
            random.Random(f"{self.seed}/{epoch}").shuffle(order)
            out.append(self._train[order[pos]])
        return out

    def eval_set(self) -> list[Prompt]:
        return list(self._eval)

    def reward(self, prompt: Prompt, response_ids: list[int]) -> float:
        predicted = extract_answer(self.tokenizer.decode(response_ids))
        return float(predicted is not None and answers_match(predicted, prompt.answer))
