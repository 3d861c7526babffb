"""Bring your own data: JSONL, Parquet and save_to_disk datasets, field mapping, the model's chat
template, system prompt, the over-long filter, deterministic epochs, and each error path."""

import json
import logging

import pytest

from byo_util import chat_tokenizer, problems
from moerl.tasks.dataset import DatasetTask, read_records
from moerl.tasks.math_jsonl import HFTokenizer, MathJsonlTask


def write_all_formats(tmp_path, rows):
    """The same records as JSONL, Parquet, a saved Dataset and a saved DatasetDict."""
    import datasets
    import pyarrow as pa
    import pyarrow.parquet as pq

    jsonl = tmp_path / "d.jsonl"
    jsonl.write_text("".join(json.dumps(r) + "\n" for r in rows))
    parquet = tmp_path / "d.parquet"
    pq.write_table(pa.Table.from_pylist(rows), parquet)
    ds = datasets.Dataset.from_list(rows)
    ds.save_to_disk(str(tmp_path / "saved"))
    datasets.DatasetDict({"train": ds, "test": ds.select(range(3))}).save_to_disk(
        str(tmp_path / "saved_dict"))
    return jsonl, parquet, tmp_path / "saved", tmp_path / "saved_dict"


def test_every_format_reads_the_same_records(tmp_path):
    rows = problems(12)
    jsonl, parquet, saved, saved_dict = write_all_formats(tmp_path, rows)
    assert read_records(jsonl) == rows
    assert read_records(parquet) == rows
    assert read_records(saved) == rows
    assert read_records(saved_dict, split="train") == rows
    assert read_records(saved_dict, split="test") == rows[:3]
    with pytest.raises(ValueError, match=r"splits \['train', 'test'\]: no split 'validation'"):
        read_records(saved_dict, split="validation")
    (tmp_path / "d.csv").write_text("a,b\n")
    with pytest.raises(ValueError, match="unknown format '.csv'"):
        read_records(tmp_path / "d.csv")
    with pytest.raises(ValueError, match="not a datasets save_to_disk directory"):
        read_records(tmp_path)


def test_chat_template_system_prompt_and_field_mapping(tmp_path):
    fast = chat_tokenizer(tmp_path / "tok")
    _, parquet, _, _ = write_all_formats(tmp_path, problems(10))
    task = DatasetTask(path=str(parquet), tokenizer=HFTokenizer(str(tmp_path / "tok")),
                       prompt_field="question", answer_field="label", system_prompt="be brief",
                       eval_size=2, seed=3)
    prompt = task.eval_set()[0]
    row = problems(10)[8]
    messages = [{"role": "system", "content": "be brief"},
                {"role": "user", "content": row["question"]}]
    expected = fast.apply_chat_template(messages, add_generation_prompt=True,
                                        tokenize=True)["input_ids"]
    assert list(prompt.ids) == expected
    assert prompt.text.endswith("<|im_start|> assistant ")
    assert prompt.answer == str(row["label"]) and prompt.meta == {"source": row["source"]}
    assert task.reward(prompt, fast.encode(f"the answer \\boxed{{ {row['label']} }}")) == 1.0


def test_messages_field_and_no_template(tmp_path):
    fast = chat_tokenizer(tmp_path / "tok", template=False)
    rows = [{"messages": [{"role": "system", "content": "be brief"},
                          {"role": "user", "content": f"what is {i} plus 1 ?"}],
             "answer": i + 1} for i in range(4)]
    path = tmp_path / "m.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    task = DatasetTask(path=str(path), tokenizer=HFTokenizer(str(tmp_path / "tok")),
                       prompt_field="messages", system_prompt="ignored: the record has one",
                       eval_size=1)
    # Without a template: contents joined by blank lines, encoded with special tokens.
    assert task.eval_set()[0].text == "be brief\n\nwhat is 3 plus 1 ?"
    assert list(task.eval_set()[0].ids) == fast.encode("be brief\n\nwhat is 3 plus 1 ?")


def test_jsonl_math_uses_the_chat_template(tmp_path):
    """Regression: transformers 5's apply_chat_template(tokenize=True) returns a dict, which the
    jsonl_math task used to turn into the tuple of its keys."""
    fast = chat_tokenizer(tmp_path / "tok")
    path = tmp_path / "m.jsonl"
    path.write_text("".join(json.dumps({"prompt": r["question"], "answer": r["label"]}) + "\n"
                            for r in problems(6)))
    task = MathJsonlTask(path=str(path), tokenizer=HFTokenizer(str(tmp_path / "tok")),
                         eval_size=1)
    expected = fast.apply_chat_template([{"role": "user", "content": problems(6)[5]["question"]}],
                                        add_generation_prompt=True, tokenize=True)["input_ids"]
    assert list(task.eval_set()[0].ids) == expected


def test_over_long_prompts_are_dropped_and_counted(tmp_path, caplog):
    chat_tokenizer(tmp_path / "tok")
    rows = problems(6) + [{"question": " ".join(["what"] * 40), "label": 0, "source": "long"}]
    path = tmp_path / "d.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    with caplog.at_level(logging.WARNING, logger="moerl.tasks"):
        task = DatasetTask(path=str(path), tokenizer=HFTokenizer(str(tmp_path / "tok")),
                           prompt_field="question", answer_field="label", max_prompt_tokens=20,
                           eval_size=0)
    assert "dropped 1 of 7 prompts longer than 20 tokens" in caplog.text
    assert {p.meta["source"] for p in task.prompts(0, 6)} == {r["source"] for r in problems(6)}


def test_order_is_a_function_of_seed_and_step_with_epochs(tmp_path):
    chat_tokenizer(tmp_path / "tok")
    _, parquet, _, _ = write_all_formats(tmp_path, problems(10))
    make = lambda seed: DatasetTask(path=str(parquet), prompt_field="question",  # noqa: E731
                                    tokenizer=HFTokenizer(str(tmp_path / "tok")),
                                    answer_field="label", eval_size=0, seed=seed)
    task = make(1)
    epoch0 = [p.meta["source"] for step in range(5) for p in task.prompts(step, 2)]
    epoch1 = [p.meta["source"] for step in range(5, 10) for p in task.prompts(step, 2)]
    assert sorted(epoch0) == sorted(epoch1) == sorted(r["source"] for r in problems(10))
    assert epoch0 != epoch1  # a new shuffle per epoch
    resumed = make(1)  # a fresh process asking for step 7 first sees what the first one saw
    assert resumed.prompts(7, 2) == task.prompts(7, 2) and resumed.prompts(3, 2) == \
        task.prompts(3, 2)
    assert [p.meta["source"] for p in make(2).prompts(0, 10)] != epoch0


@pytest.mark.parametrize("row, match", [
    ({"prompt": "what is 1 plus 1 ?"}, r"record 0: no field 'question' \(fields: \['prompt'\]\)"),
    ({"question": 5}, "must be a string or a non-empty list"),
    ({"question": [{"role": "user"}]}, "must be a string or a non-empty list"),
])
def test_bad_records_name_the_record_and_field(tmp_path, row, match):
    chat_tokenizer(tmp_path / "tok")
    path = tmp_path / "d.jsonl"
    path.write_text(json.dumps(row) + "\n")
    with pytest.raises(ValueError, match=match):
        DatasetTask(path=str(path), tokenizer=HFTokenizer(str(tmp_path / "tok")),
                    prompt_field="question", eval_size=0)


def test_too_small_for_the_eval_hold_out(tmp_path):
    chat_tokenizer(tmp_path / "tok")
    path = tmp_path / "d.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in problems(3)))
    with pytest.raises(ValueError, match="not enough to hold out task.eval_size=64"):
        DatasetTask(path=str(path), tokenizer=HFTokenizer(str(tmp_path / "tok")),
                    prompt_field="question")


def test_dataset_keys_on_another_task_are_reported(caplog):
    from moerl.config import load_config
    from moerl.tasks import build_task

    cfg = load_config(overrides=["task.system_prompt=be brief", "task.prompt_field=q"])
    with caplog.at_level(logging.WARNING, logger="moerl.tasks"):
        build_task(cfg.task, model_dir="", max_prompt_tokens=100)
    assert ("task.prompt_field, task.system_prompt only apply to task.name=dataset; "
            "task.name=arithmetic ignores them") in caplog.text
