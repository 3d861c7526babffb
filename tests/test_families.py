"""Model families beyond Qwen3-MoE/Mixtral, and vocabulary padding, end to end on the Megatron side.

Tiny random-weight checkpoints (``tests/family_models.py``: DeepSeek-V3 with MLA and YaRN, GLM-4.5,
Qwen2-MoE and OLMoE (QK-norm over the full projection), all with odd vocabularies, plus a Qwen3-MoE with an odd vocabulary and tied
embeddings), fp32 on CPU:

- HF load -> export is bit-identical at TP/EP/ETP 1/1/1, 2/2/1, 2/1/1, 1/2/1 and 2/1/2
  (vocabulary padding is zero-filled on load and stripped on export);
- log-probs match transformers within 1e-4 at every layout (padded logits excluded);
- ``tools/parity.py`` at TP=2/EP=2 (sequence parallel): route agreement 1.0 with the HF routers
  (GLM: sigmoid + expert bias + grouped top-k; Qwen2-MoE, OLMoE: softmax without renormalisation);
- TP=2/EP=2/SP against TP=1 on one training step (DeepSeek-V3, GLM-4.5 and OLMoE, whose QK-norm
  spans the heads of every TP rank): log-probs within 1e-5, gradients within 1e-5 relative to each
  tensor's norm, and the expert bias (frozen in RL) unchanged by the step.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent / "dist"))
sys.path.insert(0, str(Path(__file__).parent))
from family_models import MAKERS  # noqa: E402
from model_common import hf_target_logprobs, torchrun  # noqa: E402
from e2e_util import run  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
LAYOUTS_2 = ("2,2,1", "2,1,1", "1,2,1", "2,1,2")
NAMES = ("deepseek_v3", "glm4_moe", "qwen2_moe", "olmoe", "qwen3_odd")
RUNS = [f"{n}/{spec}" for n in NAMES for spec in ("1,1,1", *LAYOUTS_2)]
LOGP_TOL, TP_LOGP_TOL, GRAD_REL_TOL = 1e-4, 1e-5, 1e-5


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory):
    from moerl.tiny_model import create_tiny_hf_model

    root = tmp_path_factory.mktemp("families")
    made = {name: make(root / name) for name, make in MAKERS.items()}
    made["qwen3_odd"] = create_tiny_hf_model(root / "qwen3_odd", seed=2, vocab_size=61,
                                             tie_word_embeddings=True)
    return made


@pytest.fixture(scope="module")
def bridge(ckpts, tmp_path_factory):
    out = tmp_path_factory.mktemp("families_bridge")
    paths = [str(ckpts[n]) for n in NAMES]
    torchrun("bridge_run.py", "--ckpts", *paths, "--out", str(out), "--layouts", "1,1,1",
             nproc=1)
    torchrun("bridge_run.py", "--ckpts", *paths, "--out", str(out), "--layouts", *LAYOUTS_2,
             nproc=2, timeout_s=900)
    return out, json.loads((out / "bridge_results.json").read_text())


def test_round_trip_is_bit_identical_at_every_layout(bridge):
    _, results = bridge
    assert sorted(results) == sorted(RUNS)
    for layout_run, per_rank in results.items():
        for res in per_rank:
            assert res["order_ok"], layout_run
            assert (res["missing"], res["extra"], res["mismatched"]) == ([], [], []), (
                layout_run, res)


@pytest.mark.parametrize("name", NAMES)
def test_logprobs_match_transformers_at_every_layout(bridge, ckpts, name):
    out, _ = bridge
    reference = hf_target_logprobs(ckpts[name])
    for spec in ("1,1,1", *LAYOUTS_2):
        got = torch.load(out / f"logp_{name}_{spec.replace(',', '_')}.pt", weights_only=True)
        diff = (got - reference).abs().max().item()
        assert diff <= LOGP_TOL, f"{name} {spec}: max |dlogp| {diff:.3g}"


@pytest.mark.parametrize("name", ["deepseek_v3", "glm4_moe", "qwen2_moe", "olmoe"])
def test_parity_tool_routes_agree_with_transformers_tp2_ep2(ckpts, name):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           str(REPO / "tools" / "parity.py"), "--hf", str(ckpts[name]), "--tp", "2", "--ep", "2",
           "--seq", "16"]
    proc = run(cmd, timeout=300, env={"PYTHONWARNINGS": "ignore"}, check=False)
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads(next(line for line in proc.stdout.splitlines() if line.startswith("{")))
    assert report["route_agreement"] == 1.0, report
    assert report["max_abs_logp_diff"] <= LOGP_TOL, report


# Expert-bias buffers per family (MoE layers of a sigmoid router); OLMoE has none.
EXPERT_BIASES = {"deepseek_v3": 2, "glm4_moe": 2, "olmoe": 0}


@pytest.fixture(scope="module", params=sorted(EXPERT_BIASES))
def family_step(request, ckpts, tmp_path_factory):
    """One training step at TP=1 and at TP=2/EP=2/SP of the sigmoid-router families and of
    OLMoE (its full-projection QK-norm all-reduces across TP)."""
    out = tmp_path_factory.mktemp(f"families_step_{request.param}")
    ckpt = str(ckpts[request.param])
    torchrun("model_train.py", "--ckpt", ckpt, "--out", str(out), "--layouts", "1,1,1",
             "--step-only", nproc=1)
    torchrun("model_train.py", "--ckpt", ckpt, "--out", str(out), "--layouts", "2,2,1",
             "--step-only", nproc=2)

    def load(tag: str, what: str):
        if what == "results":  # per rank: {"step1": {"grad_norm": ..., ...}, ...}
            return json.loads((out / f"{tag}_results.json").read_text())
        return torch.load(out / f"{tag}_{what}.pt", weights_only=True)

    return request.param, load


def test_tp2_ep2_sp_matches_tp1_logprobs_and_gradients(family_step):
    _, step = family_step
    ref, got = step("1_1_1", "logp"), step("2_2_1", "logp")
    assert (got - ref).abs().max().item() <= TP_LOGP_TOL
    g_ref, g_got = step("1_1_1", "grads"), step("2_2_1", "grads")
    assert list(g_got) == list(g_ref)
    for name, g in g_ref.items():
        if name.endswith("e_score_correction_bias"):
            assert not g.any(), name  # a buffer: never trained
            continue
        norm = g.norm().item()
        assert norm > 0.0, f"{name} received no gradient"
        assert (g_got[name] - g).norm().item() / norm <= GRAD_REL_TOL, name
    # Replicated weights (the full-projection QK-norm's) count once in the global grad norm.
    ref_norm = step("1_1_1", "results")[0]["step1"]["grad_norm"]
    for rank in step("2_2_1", "results"):
        assert abs(rank["step1"]["grad_norm"] - ref_norm) <= GRAD_REL_TOL * ref_norm, rank


@pytest.mark.parametrize("tag", ["1_1_1", "2_2_1"])
def test_expert_bias_is_frozen_by_a_training_step(family_step, tag):
    family, step = family_step
    before, after = step(tag, "before"), step(tag, "after")
    biases = [n for n in before if n.endswith("e_score_correction_bias")]
    assert len(biases) == EXPERT_BIASES[family]  # MoE layers 1 and 2 (0 is dense)
    for name in biases:
        assert before[name].abs().sum() > 0 and torch.equal(before[name], after[name]), name
    router = "model.layers.1.mlp.gate.weight"
    assert not torch.equal(before[router], after[router])  # the router itself does train


def _glm_arch():
    from moerl.families import architecture_from_hf

    return architecture_from_hf(_glm_arch_dict())


def test_sigmoid_router_settings_freeze_the_bias_and_keep_the_hf_rule():
    from moerl.families.base import router_settings

    arch = _glm_arch()
    assert arch.moe_layers == (False, True, True) and arch.shared_expert_ffn == 32
    settings = router_settings(arch.router)
    assert settings["moe_router_score_function"] == "sigmoid"
    assert settings["moe_router_enable_expert_bias"] is True
    assert settings["moe_router_bias_update_rate"] == 0.0
    assert (settings["moe_router_num_groups"], settings["moe_router_group_topk"]) == (4, 2)
    assert settings["moe_router_topk_scaling_factor"] == 2.5
    assert settings["moe_router_dtype"] == "fp32"


@pytest.mark.parametrize("edit, match", [
    (dict(norm_topk_prob=False), "norm_topk_prob=false with a sigmoid router"),
    (dict(num_experts_per_tok=6, n_group=4, topk_group=2), "num_experts_per_tok / topk_group"),
])
def test_sigmoid_configs_megatron_cannot_reproduce_are_refused(edit, match):
    from moerl.families import architecture_from_hf

    cfg = {**_glm_arch_dict(), **edit}
    with pytest.raises(ValueError, match=match):
        architecture_from_hf(cfg)


def _glm_arch_dict() -> dict:
    from transformers import Glm4MoeConfig

    return Glm4MoeConfig(
        vocab_size=61, hidden_size=64, intermediate_size=96, moe_intermediate_size=32,
        num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
        n_routed_experts=8, n_shared_experts=1, num_experts_per_tok=4, n_group=4, topk_group=2,
        first_k_dense_replace=1, routed_scaling_factor=2.5, norm_topk_prob=True).to_dict()


@pytest.mark.parametrize("setting, value, match", [
    ("moe_router_fusion", True, "bypasses RouterReplay"),
    ("moe_router_bias_update_rate", 1e-3, "must stay frozen"),
])
def test_replay_guards_refuse_fused_router_and_moving_bias(setting, value, match):
    from moerl.trainer.cpu_compat import apply_cpu_patches
    from moerl.trainer.model import check_replay_config, transformer_config
    from moerl.trainer.parallel import ParallelLayout

    apply_cpu_patches()
    layout = ParallelLayout(world=1, rank=0, tp=1, ep=1, etp=1, dp=1, expert_dp=1, tp_rank=0,
                            ep_rank=0, dp_rank=0)
    config = transformer_config(_glm_arch(), layout, bf16=False)
    check_replay_config(config)  # moerl's own settings pass
    setattr(config, setting, value)
    with pytest.raises(ValueError, match=match):
        check_replay_config(config)


@pytest.mark.parametrize("edit, match", [
    (dict(clip_qkv=8.0), "clip_qkv=8.0 is not supported"),
    (dict(attention_bias=True), "attention_bias=true"),
    (dict(head_dim=32), "head_dim=32 differs from hidden_size / num_attention_heads = 16"),
    (dict(rope_parameters={"rope_type": "linear", "factor": 2.0, "rope_theta": 1e4}),
     "rope_type 'linear'"),
])
def test_olmoe_configs_megatron_cannot_reproduce_are_refused(edit, match):
    from transformers import OlmoeConfig

    from moerl.families import architecture_from_hf

    cfg = OlmoeConfig(vocab_size=53, hidden_size=64, intermediate_size=32, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, num_experts=8,
                      num_experts_per_tok=4).to_dict()
    arch = architecture_from_hf(cfg)
    assert arch.qk_norm_full_projection and arch.moe_layers == (True, True)
    with pytest.raises(ValueError, match=match):
        architecture_from_hf({**cfg, **edit})
