"""HF <-> Megatron bridge: bit-identical round trips for several TP/EP/ETP layouts, clear errors on
broken checkpoints, and log-prob parity with transformers (Qwen3-MoE and Mixtral, fp32).

The Megatron side runs in spawned torchrun processes on gloo (``tests/dist/bridge_run.py``; three
launches with a timeout each); this process builds the checkpoints and the transformers reference.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent / "dist"))
from model_common import hf_target_logprobs, torchrun  # noqa: E402

LAYOUTS_2 = ("2,2,1", "2,1,1", "1,2,1", "2,1,2")  # tp,ep,etp on two processes (2,1,2: expert TP)
LOGP_TOL = 1e-4  # the bound for fp32 HF parity
EXPECTED_RUNS = (
    [f"{c}/1,1,1" for c in ("qwen", "qwen_b", "mixtral")]
    + [f"qwen/{spec}" for spec in LAYOUTS_2] + ["qwen_b/2,2,1", "mixtral/2,2,1"])


def _tiny_mixtral(out: Path) -> Path:
    """Every layer MoE, experts w1/w3/w2 under block_sparse_moe, tied embeddings, no QK-norm."""
    from transformers import MixtralConfig, MixtralForCausalLM

    config = MixtralConfig(
        vocab_size=64, hidden_size=64, intermediate_size=32, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, head_dim=16, num_local_experts=4,
        num_experts_per_tok=2, max_position_embeddings=128, rms_norm_eps=1e-6,
        tie_word_embeddings=True, rope_parameters={"rope_type": "default", "rope_theta": 1e4})
    torch.manual_seed(3)
    model = MixtralForCausalLM(config).float()
    with torch.no_grad():  # non-trivial routing (see moerl.tiny_model)
        for name, param in model.named_parameters():
            if name.endswith("block_sparse_moe.gate.weight"):
                param.normal_(0.0, 1.0 / 8.0)
    model.save_pretrained(out)
    return out


def _write_sharded(src: Path, dst: Path) -> Path:
    """The same weights as two safetensors files plus model.safetensors.index.json."""
    from safetensors.torch import load_file, save_file

    tensors = load_file(src / "model.safetensors")
    names = sorted(tensors)
    halves = {"model-00001-of-00002.safetensors": names[: len(names) // 2],
              "model-00002-of-00002.safetensors": names[len(names) // 2:]}
    dst.mkdir()
    for file, part in halves.items():
        save_file({n: tensors[n] for n in part}, dst / file, metadata={"format": "pt"})
    weight_map = {n: file for file, part in halves.items() for n in part}
    (dst / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    return dst


BROKEN = {  # name -> (edit of the tensor dict, text the error must contain)
    "missing": (lambda t: t.pop("model.layers.1.mlp.experts.5.up_proj.weight"),
                "missing (1): model.layers.1.mlp.experts.5.up_proj.weight"),
    "extra": (lambda t: t.update({"model.layers.0.mlp.bogus.weight": torch.zeros(2)}),
              "unexpected (1): model.layers.0.mlp.bogus.weight"),
    "misshaped": (lambda t: t.update({"model.layers.2.self_attn.q_norm.weight": torch.ones(17)}),
                  "mis_shaped (1): model.layers.2.self_attn.q_norm.weight [17] (expected [16])"),
}


def _write_broken(src: Path, root: Path) -> list[Path]:
    from safetensors.torch import load_file, save_file

    dirs = []
    for name, (edit, _) in BROKEN.items():
        tensors = load_file(src / "model.safetensors")
        edit(tensors)
        (root / name).mkdir()
        save_file(tensors, root / name / "model.safetensors")
        dirs.append(root / name)
    return dirs


@pytest.fixture(scope="module")
def bridge(tmp_path_factory):
    from moerl.tiny_model import create_tiny_hf_model

    root = tmp_path_factory.mktemp("bridge")
    qwen = create_tiny_hf_model(root / "qwen", seed=0)
    # A second Qwen3-MoE: the dense layer in the middle, no top-k renormalisation (Megatron's
    # pre-softmax router path), 4 experts.
    qwen_b = create_tiny_hf_model(root / "qwen_b", seed=1, mlp_only_layers=[1], num_experts=4,
                                  norm_topk_prob=False)
    mixtral = _tiny_mixtral(root / "mixtral")
    sharded = _write_sharded(qwen, root / "qwen_sharded")
    out = root / "out"
    out.mkdir()
    torchrun("bridge_run.py", "--ckpts", str(qwen), str(qwen_b), str(mixtral), "--out", str(out),
             "--layouts", "1,1,1", "--also-ckpt", str(sharded),
             "--broken", *map(str, _write_broken(qwen, root)), nproc=1)
    torchrun("bridge_run.py", "--ckpts", str(qwen), "--out", str(out), "--layouts", *LAYOUTS_2,
             "--save-hf", nproc=2)
    torchrun("bridge_run.py", "--ckpts", str(qwen_b), str(mixtral), "--out", str(out),
             "--layouts", "2,2,1", nproc=2)
    results = json.loads((out / "bridge_results.json").read_text())
    return {"out": out, "results": results,
            "ckpts": {"qwen": qwen, "qwen_b": qwen_b, "mixtral": mixtral}}


def test_round_trip_is_bit_identical_for_every_layout(bridge):
    results = bridge["results"]
    assert sorted(results) == sorted(EXPECTED_RUNS)
    for run, per_rank in results.items():
        # Every rank yields every full tensor, so every rank's export is checked.
        assert len(per_rank) == (1 if run.endswith("1,1,1") else 2), run
        for res in per_rank:
            assert res["order_ok"], run  # the order hf_tensor_shapes promises (weight sync)
            assert (res["missing"], res["extra"], res["mismatched"]) == ([], [], []), (run, res)


def test_sharded_checkpoint_with_index_loads_identically(bridge):
    res = bridge["results"]["qwen/1,1,1"][0]["also:qwen_sharded"]
    assert (res["missing"], res["extra"], res["mismatched"]) == ([], [], [])


@pytest.mark.parametrize("name", sorted(BROKEN))
def test_broken_checkpoint_raises_clear_value_error(bridge, name):
    message = bridge["results"]["qwen/1,1,1"][0]["broken"][name]
    assert message is not None, f"loading the {name!r} checkpoint did not raise ValueError"
    assert "HF checkpoint does not match the qwen3_moe architecture" in message
    assert BROKEN[name][1] in message, message


@pytest.mark.parametrize("run", EXPECTED_RUNS)
def test_logprobs_match_transformers(bridge, run):
    name, spec = run.split("/")
    reference = hf_target_logprobs(bridge["ckpts"][name])
    megatron = torch.load(bridge["out"] / f"logp_{name}_{spec.replace(',', '_')}.pt",
                          weights_only=True)
    assert megatron.shape == reference.shape
    diff = (megatron - reference).abs()
    assert diff.max().item() <= LOGP_TOL, f"{run}: max {diff.max():.3g} mean {diff.mean():.3g}"


@pytest.mark.parametrize("saved", ["saved_hf", "saved_hf_sharded"])
def test_saved_checkpoint_loads_in_transformers_unchanged(bridge, saved):
    from transformers import AutoModelForCausalLM

    saved_dir = bridge["out"] / saved
    assert (saved_dir / "config.json").exists()
    index = saved_dir / "model.safetensors.index.json"
    if saved == "saved_hf":
        assert sorted(p.name for p in saved_dir.glob("*.safetensors")) == ["model.safetensors"]
    else:
        files = set(json.loads(index.read_text())["weight_map"].values())
        assert len(files) > 1 and files == {p.name for p in saved_dir.glob("*.safetensors")}
    original = AutoModelForCausalLM.from_pretrained(bridge["ckpts"]["qwen"], dtype=torch.float32)
    saved = AutoModelForCausalLM.from_pretrained(saved_dir, dtype=torch.float32)
    ref, got = original.state_dict(), saved.state_dict()
    assert ref.keys() == got.keys()
    assert all(torch.equal(ref[k], got[k]) for k in ref)


@pytest.mark.parametrize("megatron_name, unit", [
    # Transformer Engine fuses the pre-attention / dense pre-MLP norms into the next linear.
    ("decoder.layers.3.self_attention.linear_qkv.layer_norm_weight",
     "decoder.layers.3.input_layernorm.weight"),
    ("decoder.layers.0.mlp.linear_fc1.layer_norm_weight",
     "decoder.layers.0.pre_mlp_layernorm.weight"),
    # Local expert j on EP rank 1 of 2 (4 experts per rank) is global expert 4 + j, in both the
    # local-spec and the grouped-GEMM spelling.
    ("decoder.layers.2.mlp.experts.local_experts.3.linear_fc2.weight",
     "decoder.layers.2.mlp.experts.7.linear_fc2.weight"),
    ("decoder.layers.2.mlp.experts.linear_fc1.weight3",
     "decoder.layers.2.mlp.experts.7.linear_fc1.weight"),
    ("decoder.layers.2.mlp.router.weight", "decoder.layers.2.mlp.router.weight"),
])
def test_megatron_spellings_map_to_one_unit(megatron_name, unit):
    from moerl.trainer.hf_bridge import _canonical_key

    assert _canonical_key(megatron_name, experts_per_rank=4, ep_rank=1) == unit


def test_hf_tensor_shapes_lists_every_tensor_once_in_layer_order():
    from moerl.tiny_model import TINY_QWEN3_MOE
    from moerl.trainer.hf_bridge import hf_tensor_shapes
    from moerl.trainer.model import architecture_from_hf

    arch = architecture_from_hf({**TINY_QWEN3_MOE, "model_type": "qwen3_moe"})
    shapes = hf_tensor_shapes(arch)
    names = list(shapes)
    assert names[0] == "model.embed_tokens.weight" and names[-1] == "lm_head.weight"
    # 1 embedding + norm + head; per layer 2 norms, q/k/v/o, 2 QK-norms; dense: 3; MoE: router
    # + 3 per expert.
    assert len(names) == 3 + 3 * 8 + 3 + 2 * (1 + 3 * 8)
    assert shapes["model.layers.0.self_attn.q_proj.weight"] == (64, 64)
    assert shapes["model.layers.0.self_attn.k_proj.weight"] == (32, 64)
    assert shapes["model.layers.0.mlp.down_proj.weight"] == (64, 128)
    assert shapes["model.layers.1.mlp.experts.7.down_proj.weight"] == (64, 32)
    assert shapes["model.layers.2.mlp.gate.weight"] == (8, 64)
    layer_of = [int(n.split(".")[2]) for n in names if n.startswith("model.layers.")]
    assert layer_of == sorted(layer_of)
