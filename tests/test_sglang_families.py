"""A real SGLang 0.5.23 CPU server on the new families, held to moerl's trainer.

For each family SGLang serves on CPU (the test marked ``sglang``), one server on a tiny fp32
checkpoint of it generates; the trainer (``tools/parity.py`` at TP=2/EP=2 with sequence
parallelism) scores the same sequences: SGLang's routes equal the trainer's natural routes for
every (token, MoE layer) and its full-vocabulary log-probs equal the trainer's within 1e-4. The
checkpoints keep what makes each family different (``tests/family_models.py``):

- OLMoE: full-projection QK-norm (all-reduced across TP in the trainer), softmax top-4 of 8
  without renormalisation. SGLang's OLMoE hard-codes ``k_norm`` to ``hidden_size`` values (no GQA)
  and ``eps=1e-5``, so the model has as many KV heads as heads and that eps, as OLMoE-1B-7B ships.
- GLM-4.5: sigmoid router with a non-zero expert bias, 4 groups top-2, routed scaling factor,
  shared expert, q/k/v bias, partial rotary, QK-norm, a dense first layer.
- Qwen2-MoE: softmax top-2 without renormalisation, a shared expert with its own sigmoid gate,
  q/k/v bias; every layer MoE (SGLang builds every Qwen2-MoE layer as MoE; moerl refuses dense
  layers against it). Served only with moerl's CPU shim of SGLang's shared-expert gate
  (``launch/sglang_cpu/shims.py``).
- DeepSeek-V3: MLA with query LoRA and YaRN (SGLang's CPU RoPE supports only DeepSeek's YaRN for
  MLA), a dense first layer, a shared expert, the sigmoid router with bias and groups, scaling
  factor 2.5; its ``config.json`` with the fields released checkpoints carry and SGLang reads
  (``moerl.rollout.sglang.check_config_servable``). Served correctly only with moerl's CPU shim
  that sends SGLang's torch_native backend to the absorbed MLA path.

The trainer side refuses, before a start-up, a DeepSeek-V3 config as transformers 5 saves it
(without those fields): checked here without SGLang.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch

from moerl.rollout.client import RolloutClient
from moerl.rollout.protocol import MoeLayout
from moerl.rollout.sglang import (DEEPSEEK_V3_SGLANG_FIELDS, UnservableModelError,
                                  check_config_servable)
from e2e_util import run
from sglang_util import running_sglang

sys.path.insert(0, str(Path(__file__).parent))
from family_models import (make_deepseek_v3, make_glm4_moe, make_olmoe,  # noqa: E402
                           make_qwen2_moe)

REPO = Path(__file__).resolve().parents[1]
PROMPTS = [[1, 5, 9, 13, 7, 3], [1, 30, 31, 32, 4, 8]]  # equal lengths: one [B, S] batch
NEW_TOKENS = 10  # prompt + response = 16, a multiple of TP
LOGP_TOL = 1e-4  # the bound for fp32 parity between implementations


def trainer_scores(ckpt: Path, ids: list[list[int]], tmp_path: Path) -> dict:
    (tmp_path / "ids.json").write_text(json.dumps(ids))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           str(REPO / "tools" / "parity.py"), "--hf", str(ckpt), "--tp", "2", "--ep", "2",
           "--ids", str(tmp_path / "ids.json"), "--dump", str(tmp_path / "trainer.pt")]
    proc = run(cmd, timeout=600, env={"PYTHONWARNINGS": "ignore"}, check=False)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return torch.load(tmp_path / "trainer.pt", weights_only=True)


def read_config(ckpt: Path) -> dict:
    return json.loads((ckpt / "config.json").read_text())


def released_deepseek_v3(out: Path) -> Path:
    """The tiny DeepSeek-V3 with the config fields released checkpoints carry."""
    ckpt = make_deepseek_v3(out)
    config = {**read_config(ckpt), **DEEPSEEK_V3_SGLANG_FIELDS}
    (ckpt / "config.json").write_text(json.dumps(config, indent=2))
    return ckpt


# The cheapest tiny checkpoint of each family that SGLang serves (see the module docstring).
SERVED_FAMILIES = {
    "olmoe": lambda out: make_olmoe(out, kv_heads=4, rms_norm_eps=1e-5),
    "glm4_moe": make_glm4_moe,
    "qwen2_moe": lambda out: make_qwen2_moe(out, mlp_only_layers=()),
    "deepseek_v3": released_deepseek_v3,
}


def test_a_deepseek_v3_config_without_sglangs_fields_is_refused(tmp_path):
    """Before a local SGLang start-up is spent on it (no server is launched here)."""
    from moerl.rollout_manager import RolloutManager, SamplingSettings

    ckpt = make_deepseek_v3(tmp_path / "deepseek_v3")  # as transformers 5 saves it
    config, layout = read_config(ckpt), MoeLayout.from_hf_config(ckpt)
    manager = RolloutManager(
        builtin=False, local_sglang=True, url="", api_key="", engine_dtype="float32",
        concurrency=1, timeout_s=10.0, max_retries=0, seed=1, layout=layout,
        sampling=SamplingSettings(temperature=1.0, top_p=1.0, top_k=4, min_p=0.0,
                                  max_new_tokens=4, stop_token_ids=(2,)),
        return_routes=True, require_routes=True, return_mask=False, require_mask=False,
        sync_method="disk", bucket_mb=8, sync_address="", sync_port=0, run_dir=tmp_path,
        hf_config_dir=str(ckpt))
    with pytest.raises(UnservableModelError, match="'topk_method': '<missing>'"):
        manager.start(ckpt, version="step-0")
    assert not manager.servers and not (tmp_path / "rollout_server.log").exists()
    other = {**config, **DEEPSEEK_V3_SGLANG_FIELDS, "scoring_func": "softmax"}
    with pytest.raises(UnservableModelError, match="'scoring_func': 'softmax'"):
        check_config_servable(other, layout)
    check_config_servable({**config, **DEEPSEEK_V3_SGLANG_FIELDS}, layout)


@pytest.mark.parametrize("override, message", [
    ({"rms_norm_eps": 1e-6}, "rms_norm_eps=1e-06"),
    ({"norm_topk_prob": True}, "norm_topk_prob=true"),
    ({"num_key_value_heads": 2}, "2 key/value heads for 4 heads")])
def test_an_olmoe_config_sglang_serves_wrongly_is_refused(override, message):
    config = {"model_type": "olmoe", "num_hidden_layers": 2, "num_experts": 8, "vocab_size": 53,
              "num_experts_per_tok": 4, "num_attention_heads": 4, "num_key_value_heads": 4,
              "rms_norm_eps": 1e-5, "norm_topk_prob": False}
    layout = MoeLayout.from_hf_config(config)
    check_config_servable(config, layout)  # OLMoE-1B-7B's settings
    with pytest.raises(UnservableModelError, match=message):
        check_config_servable({**config, **override}, layout)


class _ServedFamily:
    """One family's check, a class per family: tools/test.sh's pytest-xdist workers
    (``--dist loadscope``) take each class on its own, so the four servers start on both."""

    family = ""

    @pytest.mark.sglang
    @pytest.mark.timeout(1500)  # one SGLang start-up: ~2 min idle, several on a loaded 2-core CPU
    def test_sglang_routes_and_logprobs_equal_the_trainers(self, tmp_path):
        check_served_family(self.family, tmp_path)


class TestOLMoE(_ServedFamily):
    family = "olmoe"


class TestGLM4MoE(_ServedFamily):
    family = "glm4_moe"


class TestQwen2MoE(_ServedFamily):
    family = "qwen2_moe"


class TestDeepSeekV3(_ServedFamily):
    family = "deepseek_v3"


def check_served_family(family: str, tmp_path: Path) -> None:
    ckpt = SERVED_FAMILIES[family](tmp_path / family)
    layout = MoeLayout.from_hf_config(ckpt)
    check_config_servable(read_config(ckpt), layout)  # what moerl checks before a local start
    with running_sglang(ckpt) as server:
        client = RolloutClient(server.url, layout=layout, concurrency=4)
        samples = client.generate_sync(PROMPTS, n=2, sampling_params={
            "temperature": 1.0, "top_k": 20, "max_new_tokens": NEW_TOKENS, "ignore_eos": True})
    assert len(samples) == 4
    trainer = trainer_scores(ckpt, [s.prompt_ids + s.response_ids for s in samples], tmp_path)
    for b, s in enumerate(samples):
        P, R = len(s.prompt_ids), len(s.response_ids)
        assert R == NEW_TOKENS
        diff = (s.full_logprobs_R - trainer["logp_BS"][b, P - 1:P - 1 + R]).abs().max().item()
        assert diff <= LOGP_TOL, f"{family} sample {b}: max |dlogp| {diff:.3g}"
        T = P + R - 1  # SGLang's rows: the last token never went through the model
        for i, layer in enumerate(layout.moe_layers):
            sglang_TK = s.routes_TLK[:, layer].long().sort(-1).values
            trainer_TK = trainer["routes_BSLK"][b, :T, i].long().sort(-1).values
            assert torch.equal(sglang_TK, trainer_TK), f"{family} sample {b}, layer {layer}"
