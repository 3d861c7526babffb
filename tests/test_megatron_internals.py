"""Megatron internals moerl relies on outside the CPU patches and routing replay (those are guarded
in test_cpu_compat.py and test_routing_replay.py): each test fails if upstream changes underneath
moerl, on either supported release (0.16.1, 0.19.2).

The behaviour itself (gradients, norms, clipping, skips, resume) is checked on real models in
test_model_parallel.py; these guards catch the silent kind of change, where moerl's replica of an
upstream sequence would keep running but stop matching it.
"""

from __future__ import annotations

import ast
import importlib.util
import inspect
import math
from pathlib import Path

import pytest

from moerl.trainer import megatron_version

pytestmark = pytest.mark.compat


def _source(module: str, qualname: str) -> str:
    """Source of the class or function ``qualname`` in ``module``, as installed."""
    text = Path(importlib.util.find_spec(module).origin).read_text()
    node = ast.parse(text)
    for part in qualname.split("."):
        node = next(n for n in ast.iter_child_nodes(node)
                    if isinstance(n, (ast.FunctionDef, ast.ClassDef)) and n.name == part)
    return ast.get_source_segment(text, node)


def test_chained_optimizer_step_is_what_trainer_optimizer_step_replicates():
    """``TrainerOptimizer.step`` is upstream's ``ChainedOptimizer.step`` minus its unconditional
    update (it skips on a non-finite norm on any rank): same calls, same clip coefficient."""
    step = _source("megatron.core.optimizer.optimizer", "ChainedOptimizer.step")
    for construct in ("self.prepare_grads()", "self.get_grad_norm()",
                      "clip_grad_by_total_norm_fp32(", "max_norm=optimizer.config.clip_grad",
                      "total_norm=grad_norm", "use_precision_aware_optimizer_no_fp8_or_ds_fp8",
                      "self.step_with_ready_grads()"):
        assert construct in step, f"ChainedOptimizer.step no longer has {construct!r}"
    clip = _source("megatron.core.optimizer.clip_grads", "clip_grad_by_total_norm_fp32")
    assert "clip_coeff = max_norm / (total_norm + 1.0e-6)" in clip
    for name in ("prepare_grads", "get_grad_norm", "step_with_ready_grads", "get_parameters"):
        assert name in _source("megatron.core.optimizer.optimizer", "MegatronOptimizer")


def test_upstream_step_additions_do_not_apply_to_moerl_models():
    """0.19's ``ChainedOptimizer.step`` also clips separate grad-norm groups (MTP layers only)
    and skips above ``grad_norm_skip_threshold`` (infinite unless set): moerl builds no MTP
    layers and sets no threshold, so its replica equals upstream's step there."""
    from megatron.core.optimizer import OptimizerConfig
    from megatron.core.optimizer import optimizer as moptimizer

    step = _source("megatron.core.optimizer.optimizer", "ChainedOptimizer.step")
    if not megatron_version.at_least(0, 19):
        assert "grad_norm_group" not in step and "grad_norm_skip_threshold" not in step
        return
    assert moptimizer.SEPARATE_GRAD_NORM_GROUPS == (moptimizer.MTP_GRAD_NORM_GROUP,)
    assert math.isinf(OptimizerConfig().grad_norm_skip_threshold)
    from moerl.trainer import model

    assert "mtp" not in inspect.getsource(model.transformer_config).lower()


def test_ddp_keeps_gradients_in_main_grad():
    """moerl reads ``param.main_grad`` (export of gradients, tests) and zeroes it through
    ``zero_grad_buffer``; ``finalize_model_grads`` takes the list of DDP chunks."""
    buffers = _source("megatron.core.distributed.param_and_grad_buffer", "_ParamAndGradBuffer")
    assert "param.main_grad = self._get(" in buffers
    from megatron.core.distributed import DistributedDataParallel, finalize_model_grads

    assert callable(DistributedDataParallel.zero_grad_buffer)
    params = list(inspect.signature(finalize_model_grads).parameters)
    assert params[0] == "model" and "num_tokens" in params


def test_gpt_model_calls_the_output_layer_as_the_critic_head_expects():
    """The PPO critic replaces ``output_layer`` with a value head of the same call signature."""
    forward = "\n".join(inspect.getsource(f) for f in _gpt_postprocess_functions())
    assert "self.output_layer(" in forward
    assert "weight=output_weight, runtime_gather_output=runtime_gather_output" in forward
    if "self._scale_logits(" in forward:  # 0.19: MuP scaling of what the head returns
        from megatron.core.transformer import TransformerConfig

        config = TransformerConfig(num_layers=1, hidden_size=8, num_attention_heads=2)
        assert config.use_mup is False


def _gpt_postprocess_functions():
    from megatron.core.models.gpt.gpt_model import GPTModel

    return [getattr(GPTModel, name) for name in ("forward", "_postprocess")
            if hasattr(GPTModel, name)]
