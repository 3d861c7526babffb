"""rollout.engine_dtype=float16 (issue 10): the built-in engine runs the policy in fp16, and its
log-probs sit closer to the fp32 trainer's than bf16's do (10 mantissa bits against 7), which is
why FP16 rollouts are the field's other answer to the train/inference mismatch."""

import numpy as np
import pytest
import torch

from moerl.rollout.engine import Engine, GenerationRequest
from moerl.rollout.sampler import SamplingSpec
from moerl.rollout.schema import GenerateItem

pytestmark = pytest.mark.usefixtures("one_torch_thread")
PROMPTS = [[1, 5, 4, 13, 5, 6, 16], [1, 7, 4, 12, 8], [1, 9, 9, 4, 3, 6, 16, 2], [1, 3, 4, 3]]


def _greedy_logprobs(model_dir, dtype: str) -> tuple[list[list[int]], np.ndarray]:
    spec = SamplingSpec(temperature=1.0, top_k=1, top_p=1.0, min_p=0.0, greedy=True,
                        max_new_tokens=4, stop_token_ids=frozenset(), ignore_eos=True, seed=0)
    outs = {}

    def request(i, prompt):
        item = GenerateItem(rid=str(i), prompt_ids=prompt, sampling=spec, return_logprob=True,
                            return_routes=False, routes_start_len=0, return_mask=False,
                            mask_mode="selected", compact=False)
        return GenerationRequest(item=item, done=lambda out: outs.__setitem__(i, out))

    engine = Engine(model_dir, dtype=dtype)
    engine.start()
    try:
        engine.submit([request(i, p) for i, p in enumerate(PROMPTS)])
        import time

        deadline = time.monotonic() + 120
        while len(outs) < len(PROMPTS):
            assert time.monotonic() < deadline
            time.sleep(0.01)
        assert engine.model.dtype == getattr(torch, dtype)
    finally:
        engine.stop()
    ordered = [outs[i] for i in range(len(PROMPTS))]
    tokens = [o["output_ids"] for o in ordered]
    logprobs = np.array([[lp[0] for lp in o["meta_info"]["output_token_logprobs"]]
                         for o in ordered])
    return tokens, logprobs


def test_float16_engine_is_closer_to_float32_than_bfloat16(model_dir):
    tokens, logprobs = {}, {}
    for dtype in ("float32", "float16", "bfloat16"):
        tokens[dtype], logprobs[dtype] = _greedy_logprobs(model_dir, dtype)
    assert tokens["float16"] == tokens["float32"]
    gap16 = np.abs(logprobs["float16"] - logprobs["float32"]).mean()
    gap_bf16 = np.abs(logprobs["bfloat16"] - logprobs["float32"]).mean()
    assert 0 < gap16 < gap_bf16, (gap16, gap_bf16)


STUB_PYTHON = """#!/usr/bin/env bash
# Stands in for python: the version probe succeeds, a launch prints its arguments.
if [[ "$1" == "-c" ]]; then exit 0; fi
printf '%s\\n' "$@"
"""


@pytest.mark.parametrize("dtype,ok", [("float16", True), ("bfloat16", True), ("fp8", False),
                                      ("half-ish", False)])
def test_sglang_launch_takes_a_serving_dtype(tmp_path, dtype, ok):
    import os
    import subprocess
    from pathlib import Path

    stub = tmp_path / "python"
    stub.write_text(STUB_PYTHON)
    stub.chmod(0o755)
    env = {**os.environ, "PYTHON": str(stub), "MODEL": "/models/qwen3-moe", "DTYPE": dtype}
    script = Path(__file__).resolve().parents[1] / "launch/sglang_server.sh"
    out = subprocess.run(["bash", str(script)], env=env, capture_output=True, text=True,
                         timeout=30)
    if ok:
        argv = out.stdout.split("\n")
        assert out.returncode == 0 and argv[argv.index("--dtype") + 1] == dtype
    else:
        assert out.returncode == 2 and f"DTYPE={dtype} is not a serving dtype" in out.stderr
