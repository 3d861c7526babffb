"""The built-in rollout engine on a DeepSeek-V3 tiny model (MLA, YaRN, sigmoid router with expert
bias and grouped top-k, a dense first layer, an odd vocabulary) and an OLMoE tiny model
(full-projection QK-norm, softmax top-4 of 8 without renormalisation): the routes it reports are
the logical expert ids the HF router selects (bias, group limit and all) for prompt and generated
tokens in SGLang's layout, and its full and truncated (keep-mask) log-probs equal a direct HF
forward, as for Qwen3-MoE in ``tests/test_rollout_server.py``."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))
from family_models import MAKERS  # noqa: E402

from moerl.rollout.client import RolloutClient  # noqa: E402
from moerl.rollout.protocol import MoeLayout  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_torch_thread")
TEMPERATURE = 0.8
PROMPTS = [[1, 5, 9, 13], [1, 7], [1, 20, 21, 22, 23, 24, 25, 26]]


@pytest.fixture(scope="module", params=["deepseek_v3", "olmoe"])
def served(request, tmp_path_factory):
    """(checkpoint, running built-in server) of one family's tiny model."""
    from moerl.rollout.server import BackgroundServer

    ckpt = MAKERS[request.param](tmp_path_factory.mktemp(request.param) / "ckpt")
    handle = BackgroundServer(ckpt, api_key=None, max_batch_size=8)
    yield ckpt, handle
    handle.stop()


def hf_reference(model_dir: Path, sample):
    """Full and kept-set log-probs of the sampled tokens, and each MoE layer's HF router top-k
    indices ([T, K], as the router returns them), from one HF forward."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    picked = {}
    for i, layer in enumerate(model.model.layers):
        if hasattr(layer.mlp, "gate"):
            layer.mlp.gate.register_forward_hook(
                lambda m, a, out, i=i: picked.__setitem__(i, out[2].reshape(-1, out[2].shape[-1])))
    seq = sample.prompt_ids + sample.response_ids
    P, R = len(sample.prompt_ids), len(sample.response_ids)
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([seq])).logits[0]
    z_RV = logits[P - 1:P - 1 + R].float() / TEMPERATURE
    y_R = torch.tensor(sample.response_ids)
    full_R = torch.log_softmax(z_RV, -1).gather(1, y_R[:, None]).squeeze(1)
    off = sample.mask_offsets_R1
    kept_R = torch.stack([
        z_RV[r, y_R[r]] - torch.logsumexp(
            z_RV[r, sample.mask_ids_M[off[r]:off[r + 1]].long()
                 if off[r + 1] > off[r] else torch.arange(z_RV.shape[1])], 0)
        for r in range(R)])
    return full_R, kept_R, picked


def test_routes_and_logprobs_match_the_hf_router_and_forward(served):
    ckpt, server = served
    layout = MoeLayout.from_hf_config(ckpt)
    client = RolloutClient(server.url, api_key=None, concurrency=4)
    samples = client.generate_sync(PROMPTS, n=2, seed=3, sampling_params={
        "temperature": TEMPERATURE, "top_k": 12, "top_p": 0.9, "max_new_tokens": 16})
    assert len(samples) == 6
    for s in samples:
        assert all(0 <= t < layout.vocab_size for t in s.response_ids)  # the real vocabulary
        full_R, kept_R, picked = hf_reference(ckpt, s)
        assert torch.allclose(s.full_logprobs_R, full_R, atol=1e-5, rtol=0)
        assert torch.allclose(s.rollout_logprobs_R, kept_R, atol=1e-5, rtol=0)
        T = len(s.prompt_ids) + len(s.response_ids) - 1
        assert s.routes_TLK.shape == (T, layout.num_hidden_layers, layout.top_k)
        for layer in layout.dense_layers:  # DeepSeek-V3's first_k_dense_replace=1: zeros
            assert not s.routes_TLK[:, layer].any()
        assert sorted(picked) == list(layout.moe_layers)
        for layer in layout.moe_layers:
            want = picked[layer][:T].sort(-1).values
            assert torch.equal(s.routes_TLK[:, layer].long().sort(-1).values, want), layer
