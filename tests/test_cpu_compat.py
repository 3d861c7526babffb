"""moerl.trainer.cpu_compat: every patch is still needed upstream, and does what it says.

Two kinds of test per patch:
- upstream guards: the CUDA-only construct the patch works around is still in megatron-core's
  source (read from the installed files, so the tests see upstream even after patching). When
  upstream drops it, the test fails and the patch is reviewed instead of silently lingering.
- behaviour: with the patches applied (on this CPU machine), the patched piece behaves like
  upstream's on CUDA. ``apply_cpu_patches`` with CUDA present must change nothing (subprocess).
"""

from __future__ import annotations

import ast
import importlib
import importlib.util
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from moerl.trainer import cpu_compat, megatron_version

pytestmark = [pytest.mark.skipif(torch.cuda.is_available(), reason="CPU patches only"),
              pytest.mark.compat]


def _upstream_source(module: str, qualname: str | None = None) -> str:
    """Source of ``module`` (or of the class/function ``qualname`` in it) as installed."""
    origin = importlib.util.find_spec(module).origin
    text = Path(origin).read_text()
    if qualname is None:
        return text
    node = ast.parse(text)
    for part in qualname.split("."):
        node = next(n for n in ast.iter_child_nodes(node)
                    if isinstance(n, (ast.FunctionDef, ast.ClassDef)) and n.name == part)
    return ast.get_source_segment(text, node)


@pytest.fixture(scope="module")
def patched():
    assert cpu_compat.apply_cpu_patches() is True
    return cpu_compat


def test_installed_megatron_core_is_one_the_patches_target():
    # The guards below encode what each supported release looks like; any other is refused.
    assert megatron_version.check_megatron_version() in [
        series.tested for series in megatron_version.SUPPORTED_SERIES]


# ---------------------------------------------------------------- patch 1: the torch stand-in

# Per module: (function or class, CUDA-only construct in it) that the stand-in redirects to CPU.
STAND_IN_GUARDS = {
    "megatron.core.models.common.embeddings.rotary_pos_embedding":
        ("RotaryEmbedding.get_emb", "self.inv_freq.to(device=torch.cuda.current_device())"),
    "megatron.core.models.common.embeddings.yarn_rotary_pos_embedding":
        ("YarnRotaryEmbedding.__init__", "torch.cuda.current_device()"),
    "megatron.core.utils": ("GlobalMemoryBuffer.get_tensor", "device=torch.cuda.current_device()"),
    "megatron.core.transformer.utils": ("get_default_causal_mask", 'device="cuda"'),
    "megatron.core.transformer.moe.router":
        ("Router.gating", "self.weight.data.to(device=torch.cuda.current_device())"),
    "megatron.core.tensor_parallel.mappings":
        ("_gather_along_last_dim", "device=torch.cuda.current_device()"),
    "megatron.core.tensor_parallel.layers":
        ("VocabParallelEmbedding.__init__", "device=torch.cuda.current_device()"),
    "megatron.core.tensor_parallel.random":
        ("model_parallel_cuda_manual_seed", "torch.cuda.manual_seed(data_parallel_seed)"),
    "megatron.core.distributed.param_and_grad_buffer":
        ("_ParamAndGradBuffer.__init__", "device=torch.cuda.current_device()"),
    "megatron.core.distributed.distributed_data_parallel":
        ("DistributedDataParallel.__init__", "torch.cuda.current_device()"),
    "megatron.core.optimizer.optimizer": ("FP32Optimizer.__init__", "device='cuda'"),
    "megatron.core.optimizer.clip_grads": ("get_grad_norm_fp32", "device='cuda'"),
}


def test_every_stand_in_module_has_a_guard():
    assert set(STAND_IN_GUARDS) == set(cpu_compat._CUDA_DEVICE_MODULES)


@pytest.mark.parametrize("module", sorted(STAND_IN_GUARDS))
def test_stand_in_module_still_allocates_on_cuda(module):
    qualname, construct = STAND_IN_GUARDS[module]
    assert construct in _upstream_source(module, qualname), (
        f"{module}.{qualname} no longer contains {construct!r}: review patch 1 for this module")


def test_upstream_grad_sync_asks_for_the_current_cuda_stream_from_0_19():
    source = _upstream_source("megatron.core.distributed.param_and_grad_buffer",
                              "_ParamAndGradBucketGroup.start_grad_sync")
    # 0.19 waits on CUDA-graph events through it (the stand-in gives the CPU stream); 0.16 not.
    assert ("current_stream = torch.cuda.current_stream()" in source) == (
        megatron_version.at_least(0, 19))
    assert "current_stream.wait_event(event)" in source or not megatron_version.at_least(0, 19)


def test_mla_patch_gives_the_local_spec_a_te_free_path(patched):
    """Patch 6: without Transformer Engine, MLA must not take its TE branch and must accept the
    replicated Linear moerl's local MLA spec uses for the down projections."""
    from megatron.core.post_training.modelopt.layers import Linear
    from megatron.core.transformer import multi_latent_attention as mla

    if isinstance(mla.TELinear, type):
        pytest.skip("Transformer Engine is installed")
    assert mla.HAVE_TE is False
    assert mla.Linear is Linear


def test_stand_in_maps_cuda_factories_to_cpu():
    stand_in = cpu_compat._CPU_TORCH
    for device in ("cuda", "cuda:0", torch.device("cuda"), stand_in.cuda.current_device()):
        assert stand_in.zeros(2, device=device).device.type == "cpu"
        assert stand_in.empty(3, dtype=torch.int32, device=device).dtype == torch.int32
    assert stand_in.tensor([1.0], device="cuda").device.type == "cpu"
    assert stand_in.cuda.current_device() == torch.device("cpu")
    stream = stand_in.cuda.current_stream()
    assert stream is torch.cpu.current_stream() and stream.wait_event(None) is None
    # Everything else is torch itself.
    assert stand_in.nn is torch.nn and stand_in.float32 is torch.float32
    assert stand_in.cuda.is_available is torch.cuda.is_available


def test_stand_in_is_installed_and_upstream_cuda_code_runs_on_cpu(patched):
    for name in cpu_compat._CUDA_DEVICE_MODULES:
        assert importlib.import_module(name).torch is cpu_compat._CPU_TORCH, name
    from megatron.core.transformer.utils import get_default_causal_mask
    from megatron.core.utils import GlobalMemoryBuffer

    mask = get_default_causal_mask(3)  # upstream: torch.ones(..., device="cuda")
    assert mask.device.type == "cpu"
    assert torch.equal(mask, torch.triu(torch.ones(3, 3), diagonal=1).bool())
    buf = GlobalMemoryBuffer().get_tensor((2, 3), torch.float32, "test")
    assert buf.device.type == "cpu" and buf.shape == (2, 3)


# ---------------------------------------------------------------- patch 2: the RNG tracker

def test_upstream_tracker_needs_the_cuda_generator():
    add = _upstream_source("megatron.core.tensor_parallel.random", "CudaRNGStatesTracker.add")
    fork = _upstream_source("megatron.core.tensor_parallel.random", "CudaRNGStatesTracker.fork")
    assert "torch.cuda.get_rng_state()" in add
    assert "_set_cuda_rng_state(self.states_[name]" in fork
    # Activation recomputation saves/restores through the two private accessors patch 2 replaces.
    states = _upstream_source("megatron.core.tensor_parallel.random", "_get_all_rng_states")
    assert "_get_cuda_rng_state(" in states
    restore = _upstream_source("megatron.core.tensor_parallel.random", "_set_all_rng_states")
    assert "_set_cuda_rng_state(" in restore


def test_tracker_fork_restores_outer_state_and_continues_the_named_stream(patched):
    from megatron.core.tensor_parallel import random as mrandom

    tracker = mrandom.CudaRNGStatesTracker()
    assert isinstance(tracker, cpu_compat.CpuRNGStatesTracker)
    tracker.add("stream", 11)
    torch.manual_seed(0)
    outer_expected = torch.rand(4)
    torch.manual_seed(0)
    with tracker.fork("stream"):
        first = torch.rand(4)
    assert torch.equal(torch.rand(4), outer_expected)  # the outer generator did not move
    with tracker.fork("stream"):
        second = torch.rand(4)
    reference = torch.Generator().manual_seed(11)
    assert torch.equal(first, torch.rand(4, generator=reference))
    assert torch.equal(second, torch.rand(4, generator=reference))  # continued, not restarted
    with pytest.raises(Exception, match="already exists"):
        tracker.add("other", 11)
    with pytest.raises(Exception, match="is not added"):
        with tracker.fork("missing"):
            pass


def test_model_parallel_seeding_is_reproducible_and_rank_dependent(patched):
    from megatron.core.tensor_parallel import random as mrandom

    def draw(tp_rank: int) -> torch.Tensor:
        mrandom.model_parallel_cuda_manual_seed(7, tp_rank=tp_rank, ep_rank=0, etp_rank=0)
        with mrandom.get_cuda_rng_tracker().fork():
            return torch.rand(5)

    assert torch.equal(draw(0), draw(0))
    assert not torch.equal(draw(0), draw(1))  # tensor-parallel ranks get different streams


def test_private_rng_accessors_read_and_write_the_cpu_generator(patched):
    from megatron.core.tensor_parallel import random as mrandom

    torch.manual_seed(3)
    state = mrandom._get_cuda_rng_state()
    assert torch.equal(state, torch.get_rng_state())
    expected = torch.rand(2)
    mrandom._set_cuda_rng_state(state)
    assert torch.equal(torch.rand(2), expected)


# ---------------------------------------------------------------- patch 3: te_general_gemm

def _te_import_block(text: str) -> ast.stmt:
    """The top-level statement of ``moe_utils`` that imports ``te_general_gemm`` from TE."""
    return next(node for node in ast.parse(text).body if isinstance(node, (ast.Try, ast.If))
                and any(isinstance(stmt, ast.ImportFrom) and "te_general_gemm" in
                        [alias.name for alias in stmt.names] for stmt in node.body))


def test_upstream_te_general_gemm_without_te_is_what_patch_3_expects():
    text = _upstream_source("megatron.core.transformer.moe.moe_utils")
    block = _te_import_block(text)
    assert "if te_general_gemm is not None" in text  # the gating GEMM's torch fallback
    if not megatron_version.at_least(0, 17):
        # 0.16: ``try: from ...transformer_engine import ..., te_general_gemm`` and the handler
        # never defines it: patch 3 applies.
        assert isinstance(block, ast.Try)
        for handler in block.handlers:
            assert "te_general_gemm" not in ast.get_source_segment(text, handler)
    else:
        # 0.17+: ``if HAVE_TE: from ... import ...`` else every name, te_general_gemm included,
        # is set to None by upstream: patch 3 is not applied.
        assert isinstance(block, ast.If) and block.orelse, "review patch 3 for this release"
        orelse = "\n".join(ast.get_source_segment(text, stmt) for stmt in block.orelse)
        assert "te_general_gemm" in orelse and "None" in orelse


def test_te_general_gemm_is_none_so_the_torch_fallback_runs(patched):
    from megatron.core.transformer.moe import moe_utils

    if moe_utils.HAVE_TE:
        pytest.skip("Transformer Engine installed")
    assert moe_utils.te_general_gemm is None


# ---------------------------------------------------------------- patch 4: norms under SP

def test_upstream_torch_norm_still_refuses_sequence_parallel():
    source = _upstream_source("megatron.core.transformer.torch_norm", "WrappedTorchNorm.__new__")
    assert "assert not config.sequence_parallel" in source


def _config(**kw):
    from megatron.core.transformer import TransformerConfig

    return TransformerConfig(num_layers=1, hidden_size=8, num_attention_heads=2, **kw)


def test_norm_marks_its_parameters_sequence_parallel_under_sp(patched):
    from megatron.core.transformer.torch_norm import WrappedTorchNorm

    sp = _config(sequence_parallel=True, tensor_model_parallel_size=2, normalization="RMSNorm")
    norm = WrappedTorchNorm(sp, 8, eps=1e-5)
    assert isinstance(norm, torch.nn.RMSNorm) and norm.eps == 1e-5
    assert norm.weight.sequence_parallel is True  # finalize_model_grads all-reduces it over TP
    plain = WrappedTorchNorm(_config(normalization="LayerNorm"), 8)
    assert isinstance(plain, torch.nn.LayerNorm)
    assert all(not getattr(p, "sequence_parallel", False) for p in plain.parameters())
    with pytest.raises(ValueError, match="Transformer Engine"):
        WrappedTorchNorm(_config(layernorm_zero_centered_gamma=True), 8)


# ---------------------------------------------------------------- patch 5: gradient clipping

def test_upstream_clip_still_asserts_a_cuda_tensor_type():
    source = _upstream_source("megatron.core.optimizer.clip_grads", "clip_grad_by_total_norm_fp32")
    assert "param.grad.type() == 'torch.cuda.FloatTensor'" in source
    assert "clip_coeff = max_norm / (total_norm + 1.0e-6)" in source  # what the patch copies


def test_clip_scales_by_the_given_total_norm(patched):
    from megatron.core.optimizer import optimizer as moptimizer

    assert moptimizer.clip_grad_by_total_norm_fp32 is cpu_compat._cpu_clip_grad_by_total_norm_fp32
    params = [torch.nn.Parameter(torch.zeros(3)), torch.nn.Parameter(torch.zeros(2)),
              torch.nn.Parameter(torch.zeros(1))]
    params[0].grad = torch.tensor([3.0, 0.0, -4.0])
    params[1].grad = torch.tensor([1.0, 2.0])  # params[2] has no gradient
    # The total norm is given (it is the global norm across ranks), not recomputed locally.
    moptimizer.clip_grad_by_total_norm_fp32(params, max_norm=1.0, total_norm=10.0)
    coeff = 1.0 / (10.0 + 1e-6)
    assert torch.allclose(params[0].grad, torch.tensor([3.0, 0.0, -4.0]) * coeff, rtol=1e-7)
    assert torch.allclose(params[1].grad, torch.tensor([1.0, 2.0]) * coeff, rtol=1e-7)
    unclipped = torch.tensor([1.0, 2.0])
    params[1].grad = unclipped.clone()
    moptimizer.clip_grad_by_total_norm_fp32(params[1:2], max_norm=5.0, total_norm=2.0)
    assert torch.equal(params[1].grad, unclipped)  # below the limit: untouched
    params[1].decoupled_grad = torch.tensor([2.0, 2.0])
    moptimizer.clip_grad_by_total_norm_fp32(params[1:2], max_norm=1.0, total_norm=4.0,
                                            use_decoupled_grad=True)
    assert torch.allclose(params[1].decoupled_grad, torch.tensor([2.0, 2.0]) / (4.0 + 1e-6))
    assert torch.equal(params[1].grad, unclipped)


# ---------------------------------------------------------------- refused configurations

def test_upstream_alltoall_dispatcher_creates_cuda_streams():
    source = _upstream_source("megatron.core.transformer.moe.token_dispatcher",
                              "MoEAlltoAllTokenDispatcher.__init__")
    assert "torch.cuda.Stream()" in source


def test_check_cpu_config_refuses_alltoall_with_the_fix_in_the_message():
    with pytest.raises(ValueError, match="model.token_dispatcher=allgather"):
        cpu_compat.check_cpu_config(token_dispatcher="alltoall")
    cpu_compat.check_cpu_config(token_dispatcher="allgather")


# ---------------------------------------------------------------- application

def test_apply_is_idempotent(patched):
    from megatron.core.tensor_parallel import random as mrandom

    assert cpu_compat.apply_cpu_patches() is True
    mro = mrandom.CudaRNGStatesTracker.__mro__
    assert sum(cls is cpu_compat.CpuRNGStatesTracker for cls in mro) == 1


def test_apply_is_a_no_op_when_cuda_is_present():
    script = textwrap.dedent("""
        import warnings; warnings.filterwarnings("ignore")
        import torch
        torch.cuda.is_available = lambda: True  # what a GPU machine reports
        from megatron.core.optimizer import optimizer as moptimizer
        from megatron.core.tensor_parallel import random as mrandom
        from megatron.core.transformer import torch_norm, utils
        before = (utils.torch, mrandom.CudaRNGStatesTracker, mrandom._get_cuda_rng_state,
                  torch_norm.WrappedTorchNorm.__new__, moptimizer.clip_grad_by_total_norm_fp32)
        from moerl.trainer.cpu_compat import apply_cpu_patches, check_cpu_config
        assert apply_cpu_patches() is False
        after = (utils.torch, mrandom.CudaRNGStatesTracker, mrandom._get_cuda_rng_state,
                 torch_norm.WrappedTorchNorm.__new__, moptimizer.clip_grad_by_total_norm_fp32)
        assert all(a is b for a, b in zip(before, after)), "patched despite CUDA"
        assert utils.torch is torch
        check_cpu_config(token_dispatcher="alltoall")  # allowed on GPU
        print("unpatched")
    """)
    # The timeout only turns a hang into a failure: importing megatron takes minutes on a
    # loaded 2-core machine.
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                          timeout=500)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.strip().endswith("unpatched")
