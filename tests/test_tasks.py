"""Tasks: the arithmetic tokenizer and verifier, the JSONL math verifier, determinism."""

import json

import pytest

from moerl.tasks.arithmetic import EOS_ID, ArithmeticTask, CharTokenizer
from moerl.tasks.math_jsonl import answers_match, extract_answer, read_jsonl


def test_char_tokenizer_round_trip_and_errors():
    tok = CharTokenizer()
    ids = tok.encode("12+30=42")
    assert tok.decode(ids + [EOS_ID, 5, 6]) == "12+30=42"  # stops at eos
    assert all(3 <= i < 64 for i in ids)
    with pytest.raises(ValueError, match="not in the arithmetic vocabulary"):
        tok.encode("x")


def test_arithmetic_reward_is_exact():
    task = ArithmeticTask(max_operand=30, seed=1)
    prompt = task.prompts(0, 1)[0]
    right = task.tokenizer.encode(prompt.answer) + [EOS_ID]
    assert task.reward(prompt, right) == 1.0
    assert task.reward(prompt, right[:-1]) == 0.0  # no eos: nothing committed
    assert task.reward(prompt, task.tokenizer.encode(prompt.answer + "1") + [EOS_ID]) == 0.0
    assert task.reward(prompt, [63, EOS_ID]) == 0.0  # unused id


def test_prompt_stream_is_deterministic_per_step():
    a, b = ArithmeticTask(seed=3), ArithmeticTask(seed=3)
    assert a.prompts(5, 8) == b.prompts(5, 8)
    assert a.prompts(5, 8) != a.prompts(6, 8)
    assert a.eval_set() == b.eval_set() and len(a.eval_set()) == 64


@pytest.mark.parametrize("text, answer", [
    ("so the answer is \\boxed{\\frac{1}{2}}", "\\frac{1}{2}"),
    ("we get 12 then 1,234 apples", "1,234"),
    ("\\boxed{x^{2}}", "x^{2}"),
    ("no number", None),
])
def test_extract_answer(text, answer):
    assert extract_answer(text) == answer


@pytest.mark.parametrize("pred, ref, ok", [
    ("1,234", "1234", True), ("0.5", "1/2", True), ("\\frac{1}{2}", "0.5", True),
    ("$42$", "42", True), ("42.0", "42", True), ("41", "42", False), ("x", "42", False),
])
def test_answers_match(pred, ref, ok):
    assert answers_match(pred, ref) is ok


def test_read_jsonl_reports_line_numbers(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_text(json.dumps({"prompt": "1+1", "answer": "2"}) + "\n{oops\n")
    with pytest.raises(ValueError, match=r"d.jsonl:2: not valid JSON"):
        read_jsonl(path, ("prompt", "answer"))
    path.write_text(json.dumps({"prompt": "1+1"}) + "\n")
    with pytest.raises(ValueError, match=r":1: missing field\(s\) \['answer'\]"):
        read_jsonl(path, ("prompt", "answer"))


def _word_level_tokenizer(out_dir):
    """A real HF fast tokenizer over a small word-level vocabulary, built offline."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = ["<pad>", "<eos>", "<unk>", "what", "is", "plus", "?", "the", "answer", "\\boxed{",
             "}", *map(str, range(40))]
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="<eos>",
                                   unk_token="<unk>")
    fast.save_pretrained(out_dir)
    return fast


def test_jsonl_math_task_with_a_real_hf_tokenizer(tmp_path):
    from moerl.tasks.math_jsonl import HFTokenizer, MathJsonlTask

    fast = _word_level_tokenizer(tmp_path)
    data = tmp_path / "math.jsonl"
    data.write_text("".join(json.dumps({"prompt": f"what is {a} plus {b} ?", "answer": a + b})
                            + "\n" for a in range(5) for b in range(5)))
    task = MathJsonlTask(path=str(data), tokenizer=HFTokenizer(str(tmp_path)), eval_size=5,
                         seed=1)
    assert len(task.eval_set()) == 5
    first = task.prompts(0, 4)
    assert first == task.prompts(0, 4) and len({p.text for p in task.prompts(0, 20)}) == 20
    prompt = first[0]
    assert list(prompt.ids) == fast.encode(prompt.text)
    right = fast.encode(f"the answer \\boxed{{ {prompt.answer} }}")
    wrong = fast.encode(f"the answer \\boxed{{ {int(prompt.answer) + 1} }}")
    assert task.reward(prompt, right) == 1.0
    assert task.reward(prompt, wrong) == 0.0
    assert task.reward(prompt, fast.encode(f"the answer is {prompt.answer}")) == 1.0


def test_pretrain_data_batches_every_token(tmp_path):
    from moerl.tasks.pretrain import PretrainData

    path = tmp_path / "pre.jsonl"
    path.write_text(json.dumps({"text": "12+3=15"}) + "\n" + json.dumps({"input_ids": [5, 6]})
                    + "\n")
    data = PretrainData(str(path), tokenizer=CharTokenizer(), max_len=64, seed=0)
    batch = data.batch(0, 4, pad_multiple=2)
    assert batch.batch_size == 4 and batch.seq_len % 2 == 0
    lengths = batch.prompt_lengths_B + batch.response_lengths_B
    assert batch.response_mask_BT.sum(-1).tolist() == (lengths - 1).tolist()
    assert data.batch(0, 4, pad_multiple=2).tokens_BT.equal(batch.tokens_BT)  # deterministic
    path.write_text(json.dumps({"input_ids": [5, 600]}) + "\n")
    with pytest.raises(ValueError, match=r"pre.jsonl:1: token ids outside \[0, 64\)"):
        PretrainData(str(path), tokenizer=CharTokenizer(), max_len=64, seed=0)


def test_chain_task_answers_step_by_step_and_verifies_every_step():
    from moerl.tasks.chain import ChainArithmeticTask, chain_text

    assert chain_text([12, 7, 25, 3]) == "12+7=19 19+25=44 44+3=47"
    task = ChainArithmeticTask(max_operand=30, num_terms=4, seed=1)
    prompt = task.prompts(0, 1)[0]
    terms = [int(t) for t in prompt.text.rstrip("=").split("+")]
    assert len(terms) == 4 and prompt.answer == chain_text(terms)
    right = task.tokenizer.encode(prompt.answer) + [EOS_ID]
    assert task.reward(prompt, right) == 1.0 and task.sft_text(prompt) == [*prompt.ids, *right]
    assert task.reward(prompt, right[:-1]) == 0.0  # no eos
    # Right final sum, wrong intermediate step: exact verifier says 0.
    steps = prompt.answer.split(" ")
    a, b = steps[0].split("=")[0].split("+")
    wrong = " ".join([f"{a}+{b}={int(a) + int(b) + 1}", *steps[1:]])
    assert task.reward(prompt, task.tokenizer.encode(wrong) + [EOS_ID]) == 0.0
    assert task.reward(prompt, task.tokenizer.encode(steps[-1].split("=")[1]) + [EOS_ID]) == 0.0
    assert 20 <= len(right) <= task.max_response_tokens() == len("30+30=60 60+30=90 90+30=120") + 1
    assert task.prompts(3, 4) == ChainArithmeticTask(max_operand=30, num_terms=4,
                                                     seed=1).prompts(3, 4)
    with pytest.raises(ValueError, match="num_terms"):
        ChainArithmeticTask(num_terms=1)


def test_build_task_makes_the_chain_task():
    from moerl.config import load_config
    from moerl.tasks import ChainArithmeticTask, build_task

    cfg = load_config(overrides=["task.name=chain", "task.num_terms=3", "task.max_operand=9"])
    task = build_task(cfg.task, model_dir="", max_prompt_tokens=64)
    assert isinstance(task, ChainArithmeticTask) and task.num_terms == 3
