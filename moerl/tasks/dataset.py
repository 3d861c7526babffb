"""Your own prompt dataset: JSONL, Parquet, or a local Hugging Face ``datasets`` directory.

Records are mapped by two field names: ``prompt_field`` holds a string (one user message) or a
list of ``{"role", "content"}`` messages; ``answer_field`` the reference answer (may be absent
when the reward needs none). Every other field is metadata, passed through to the reward. The
prompt is rendered with the model's own chat template when its tokenizer has one (a generation
prompt added, ``system_prompt`` first unless the record brings its own system message);
without a template the message contents are joined by blank lines and tokenised with the
tokenizer's special tokens.

Prompts longer than ``max_prompt_tokens`` are dropped when the data is loaded, and the count is
logged. The training stream is a deterministic function of ``(seed, step)``: every prompt is
seen once per epoch, in an order fixed by ``(seed, epoch)``, so a resumed run sees exactly what
an uninterrupted one would have.

``save_to_disk`` directories are read with ``pyarrow`` from the files their ``state.json``
lists (one ``Dataset``), or from the split named by ``split`` of a ``DatasetDict``
(``dataset_dict.json``); the ``datasets`` package is not needed and nothing touches the hub.
"""

from __future__ import annotations

import json
import logging
import random
from pathlib import Path

from moerl.tasks.base import Prompt
from moerl.tasks.math_jsonl import HFTokenizer, answers_match, extract_answer, read_jsonl

log = logging.getLogger("moerl.tasks")


# ============================================================================ reading records


def read_records(path: str | Path, *, split: str = "") -> list[dict]:
    """All records of a ``.jsonl``/``.json`` lines file, a ``.parquet`` file or a
    ``save_to_disk`` directory, as plain dicts."""
    p = Path(path)
    if p.is_dir():
        return _read_saved_dataset(p, split)
    if not p.is_file():
        raise ValueError(f"dataset {p} does not exist")
    if p.suffix in (".jsonl", ".json", ".ndjson"):
        return read_jsonl(p, ())
    if p.suffix in (".parquet", ".pq"):
        import pyarrow.parquet as pq

        rows = pq.read_table(p).to_pylist()
        if not rows:
            raise ValueError(f"{p} holds no records")
        return rows
    raise ValueError(f"dataset {p}: unknown format {p.suffix!r}; use .jsonl, .parquet or a "
                     f"directory written by datasets' save_to_disk")


def _read_saved_dataset(root: Path, split: str) -> list[dict]:
    import pyarrow as pa

    if (root / "dataset_dict.json").is_file():
        splits = json.loads((root / "dataset_dict.json").read_text())["splits"]
        chosen = split if split in splits else (splits[0] if len(splits) == 1 else None)
        if chosen is None:
            raise ValueError(f"{root} is a DatasetDict with splits {splits}: no split {split!r} "
                             f"(set task.split / task.eval_split)")
        root = root / chosen
    state = root / "state.json"
    if not state.is_file():
        raise ValueError(f"{root} is not a datasets save_to_disk directory (no state.json or "
                         f"dataset_dict.json)")
    rows: list[dict] = []
    for entry in json.loads(state.read_text())["_data_files"]:
        with pa.memory_map(str(root / entry["filename"])) as source:
            rows += pa.ipc.open_stream(source).read_all().to_pylist()
    if not rows:
        raise ValueError(f"{root} holds no records")
    return rows


# ============================================================================ prompts


def record_messages(row: dict, *, prompt_field: str, system_prompt: str, where: str) -> list[dict]:
    """The chat messages of one record (the system prompt first unless it has its own)."""
    if prompt_field not in row:
        raise ValueError(f"{where}: no field {prompt_field!r} (fields: {sorted(row)}); set "
                         f"task.prompt_field")
    value = row[prompt_field]
    if isinstance(value, str):
        messages = [{"role": "user", "content": value}]
    elif isinstance(value, list) and value and all(
            isinstance(m, dict) and isinstance(m.get("role"), str)
            and isinstance(m.get("content"), str) for m in value):
        messages = [{"role": m["role"], "content": m["content"]} for m in value]
    else:
        raise ValueError(f"{where}: field {prompt_field!r} must be a string or a non-empty list "
                         f"of {{'role', 'content'}} messages, got {type(value).__name__}")
    if system_prompt and messages[0]["role"] != "system":
        messages.insert(0, {"role": "system", "content": system_prompt})
    return messages


class DatasetTask:
    """Prompts from your own data, scored by the exact math checker unless ``task.reward`` says
    otherwise (see :mod:`moerl.rewards`)."""

    def __init__(self, *, path: str, tokenizer: HFTokenizer, eval_path: str = "",
                 split: str = "train", eval_split: str = "test", prompt_field: str = "prompt",
                 answer_field: str = "answer", system_prompt: str = "",
                 max_prompt_tokens: int = 0, eval_size: int = 64, seed: int = 7):
        self.tokenizer = tokenizer
        self.seed = seed
        self._fields = dict(prompt_field=prompt_field, answer_field=answer_field,
                            system_prompt=system_prompt)
        self._max_prompt_tokens = max_prompt_tokens
        rows = read_records(path, split=split)
        if eval_path:
            eval_rows = read_records(eval_path, split=eval_split)[:eval_size]
        elif eval_size:
            if len(rows) <= eval_size:
                raise ValueError(f"{path} has {len(rows)} records: not enough to hold out "
                                 f"task.eval_size={eval_size}; pass task.eval_path or lower "
                                 f"task.eval_size")
            rows, eval_rows = rows[:-eval_size], rows[-eval_size:]
        else:
            eval_rows = []
        self._train = self._prompts(rows, path)
        self._eval = self._prompts(eval_rows, eval_path or path)
        if not self._train:
            raise ValueError(f"every prompt of {path} is longer than task.max_prompt_tokens="
                             f"{max_prompt_tokens}")
        self._order: tuple[int, list[int]] | None = None

    def _prompts(self, rows: list[dict], path: str) -> list[Prompt]:
        prompts = [self._prompt(row, f"{path} record {i}") for i, row in enumerate(rows)]
        limit = self._max_prompt_tokens
        kept = [p for p in prompts if not limit or len(p.ids) <= limit]
        if len(kept) < len(prompts):
            log.warning("%s: dropped %d of %d prompts longer than %d tokens "
                        "(task.max_prompt_tokens)", path, len(prompts) - len(kept),
                        len(prompts), limit)
        return kept

    def _prompt(self, row: dict, where: str) -> Prompt:
        f = self._fields
        messages = record_messages(row, prompt_field=f["prompt_field"],
                                   system_prompt=f["system_prompt"], where=where)
        text, ids = self.tokenizer.render(messages)
        answer = row.get(f["answer_field"])
        meta = {k: v for k, v in row.items() if k not in (f["prompt_field"], f["answer_field"])}
        return Prompt(ids=tuple(ids), text=text, answer="" if answer is None else str(answer),
                      meta=meta)

    def prompts(self, step: int, count: int) -> list[Prompt]:
        n = len(self._train)
        out = []
        for k in range(step * count, (step + 1) * count):
            epoch, pos = divmod(k, n)
            out.append(self._train[self._epoch_order(epoch)[pos]])
        return out

    def _epoch_order(self, epoch: int) -> list[int]:
        if self._order is None or self._order[0] != epoch:
            order = list(range(len(self._train)))
            random.Random(f"{self.seed}/{epoch}").shuffle(order)
            self._order = (epoch, order)
        return self._order[1]

    def eval_set(self) -> list[Prompt]:
        return list(self._eval)

    def reward(self, prompt: Prompt, response_ids: list[int]) -> float:
        predicted = extract_answer(self.tokenizer.decode(response_ids))
        return float(predicted is not None and answers_match(predicted, prompt.answer))
