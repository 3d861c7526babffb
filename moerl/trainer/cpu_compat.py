"""Every patch moerl applies to megatron-core, so that it trains on CPU with gloo.

Megatron-core assumes CUDA. On a machine without it, moerl calls :func:`apply_cpu_patches`
before building a model; with CUDA present nothing here is applied and upstream runs untouched.
Each patch names the upstream behaviour it works around and the megatron-core releases it applies
to (the supported ones are in :mod:`moerl.trainer.megatron_version`: 0.16.1 and 0.19.2);
``tests/test_cpu_compat.py`` fails if upstream changes underneath one of them, on either release,
so a stale patch is noticed instead of silently doing the wrong thing.

The patches:

1. ``_CpuTorch`` stand-in (0.16.1, 0.19.2). Many megatron modules allocate with
   ``device='cuda'`` or ``device=torch.cuda.current_device()`` (RoPE's ``inv_freq`` move, the
   global memory buffer used by attention and sequence-parallel gathers, the default causal mask,
   the router's weight move, DDP's grad buffers, the FP32 optimizer's loss-scale tensor, grad-norm
   accumulation). Patching each function would copy dozens of upstream bodies; instead each
   listed module's global ``torch`` is replaced by a stand-in that forwards everything to
   ``torch`` except that factory calls asking for a CUDA device get the CPU, and
   ``torch.cuda.current_device()`` is the CPU. From 0.19, DDP's gradient sync also asks for
   ``torch.cuda.current_stream()`` (to wait on CUDA-graph events, which never exist on CPU): the
   stand-in answers with the CPU stream. Only the modules in :data:`_CUDA_DEVICE_MODULES`
   see it; a module missing from the list fails loudly ("Torch not compiled with CUDA enabled"),
   never silently.
2. RNG tracker (0.16.1, 0.19.2). Megatron forks a "CUDA" RNG state for tensor/expert-parallel
   regions, and activation recomputation saves and restores it; ``torch.cuda.get_rng_state``
   does not exist without CUDA, so the tracker can never be seeded. On CPU the device generator
   *is* the CPU generator: :class:`CpuRNGStatesTracker` keeps named CPU generator states, and the
   two private state accessors used by ``tensor_parallel.checkpoint`` read/write the CPU state.
   Upstream's ``model_parallel_cuda_manual_seed`` then works unchanged (its
   ``torch.cuda.manual_seed`` is a no-op without CUDA).
3. ``te_general_gemm`` (0.16 only). 0.16.1's ``moe_utils`` imports it inside ``try`` with the other
   TE names and never defines it when TE is absent, but the router's gating GEMM tests
   ``te_general_gemm is not None``, a NameError. Defining it as ``None`` selects upstream's own
   torch fallback. From 0.17 upstream sets every missing TE name to ``None`` itself: not applied.
4. Norms under sequence parallelism (0.16.1, 0.19.2). Without TE the layer specs use
   ``WrappedTorchNorm``, which asserts ``not sequence_parallel``; but TP with MoE requires SP. A
   torch norm is correct under SP (it is per token); what TE adds is marking its parameters
   ``sequence_parallel = True`` so that ``finalize_model_grads`` all-reduces their gradients
   across the TP group. The replacement builds the torch norm and sets that mark.
5. Gradient clipping (0.16.1, 0.19.2). ``clip_grad_by_total_norm_fp32`` asserts
   ``param.grad.type() == 'torch.cuda.FloatTensor'``; the replacement scales the same gradients by
   the same coefficient with ``torch._foreach_mul_``.

6. Multi-latent attention without Transformer Engine: its ``HAVE_TE`` flag, true in 0.16.1, and its
   ``Linear`` name, None in 0.19 (see :func:`_patch_mla_have_te`); YaRN RoPE allocates like patch
   1 and is in its module list.

Not patched, but refused with a clear error by :func:`check_cpu_config`: the all-to-all token
dispatcher creates CUDA streams; on CPU moerl uses the all-gather dispatcher.
"""

from __future__ import annotations

import contextlib
import functools
import importlib
import types

import torch

from moerl.trainer import megatron_version

_CPU = torch.device("cpu")

# Megatron modules whose module-global ``torch`` is replaced by the stand-in (patch 1).
_CUDA_DEVICE_MODULES = (
    "megatron.core.models.common.embeddings.rotary_pos_embedding",  # inv_freq -> current_device
    "megatron.core.models.common.embeddings.yarn_rotary_pos_embedding",  # MLA's YaRN: same
    "megatron.core.utils",  # GlobalMemoryBuffer allocates on current_device
    "megatron.core.transformer.utils",  # get_default_causal_mask(device="cuda")
    "megatron.core.transformer.moe.router",  # moves router weight to current_device
    "megatron.core.tensor_parallel.mappings",  # SP gather/scatter buffers on current_device
    "megatron.core.tensor_parallel.layers",  # weight-grad buffers on current_device
    "megatron.core.tensor_parallel.random",  # tracker seeding uses torch.cuda RNG calls
    "megatron.core.distributed.param_and_grad_buffer",  # grad buffers; 0.19: current_stream
    "megatron.core.distributed.distributed_data_parallel",  # DDP buffers on current_device
    "megatron.core.optimizer.optimizer",  # FP32Optimizer._scale on 'cuda'
    "megatron.core.optimizer.clip_grads",  # grad-norm buffers on 'cuda'
)

_FACTORIES = frozenset(
    ["tensor", "zeros", "ones", "empty", "full", "arange", "rand", "randn", "randint"]
)


class _CpuCuda:
    """``torch.cuda`` as the stand-in shows it: the current device, stream and RNG are the CPU's."""

    def __getattr__(self, name: str):
        return getattr(torch.cuda, name)

    @staticmethod
    def current_device() -> torch.device:
        return _CPU

    # 0.19: DDP's grad sync waits on CUDA-graph events through the current stream (none on CPU;
    # the CPU stream's wait_event is a no-op).
    current_stream = staticmethod(torch.cpu.current_stream)
    get_rng_state = staticmethod(torch.get_rng_state)
    set_rng_state = staticmethod(torch.set_rng_state)
    manual_seed = staticmethod(torch.manual_seed)


class _CpuTorch(types.ModuleType):
    """Stand-in for ``torch`` inside one megatron module (patch 1)."""

    def __init__(self) -> None:
        super().__init__("torch")
        self.cuda = _CpuCuda()

    def __getattr__(self, name: str):
        attr = getattr(torch, name)
        if name not in _FACTORIES:
            return attr

        @functools.wraps(attr)
        def on_cpu(*args, **kwargs):
            device = kwargs.get("device")
            if device is not None and torch.device(device).type == "cuda":
                kwargs["device"] = _CPU
            return attr(*args, **kwargs)

        return on_cpu


_CPU_TORCH = _CpuTorch()


class CpuRNGStatesTracker:
    """Megatron's CUDA RNG tracker with the CPU generator as the device generator (patch 2).

    Subclasses upstream's tracker at patch time (so ``isinstance`` checks and ``get_states`` /
    ``set_states`` / ``reset`` stay upstream's); only seeding and forking are replaced.
    """

    def add(self, name: str, seed: int) -> None:
        self._is_initialized = True
        if seed in self.seeds_:
            raise Exception(f"seed {seed} already exists")
        if name in self.states_:
            raise Exception(f"cuda rng state {name} already exists")
        self.seeds_.add(seed)
        self.states_[name] = torch.Generator().manual_seed(seed).get_state()

    @contextlib.contextmanager
    def fork(self, name: str = "model-parallel-rng"):
        if name not in self.states_:
            raise Exception(f"cuda rng state {name} is not added")
        outer = torch.get_rng_state()
        torch.set_rng_state(self.states_[name])
        try:
            yield
        finally:
            self.states_[name] = torch.get_rng_state()
            torch.set_rng_state(outer)


def _cpu_norm_new(cls, config, hidden_size: int, eps: float = 1e-5, persist_layer_norm=False,
                  zero_centered_gamma=False, normalization="LayerNorm"):
    """``WrappedTorchNorm.__new__`` that allows sequence parallelism (patch 4)."""
    if config.layernorm_zero_centered_gamma or config.persist_layer_norm:
        raise ValueError("zero-centered gamma and persistent layer norm need Transformer Engine")
    norms = {"RMSNorm": torch.nn.RMSNorm, "LayerNorm": torch.nn.LayerNorm}
    if config.normalization not in norms:
        raise ValueError(f"normalization {config.normalization!r} is not one of {sorted(norms)}")
    norm = norms[config.normalization](hidden_size, eps=eps)
    if config.sequence_parallel:
        for param in norm.parameters():
            param.sequence_parallel = True
    return norm


def _cpu_clip_grad_by_total_norm_fp32(parameters, max_norm, total_norm, use_decoupled_grad=False):
    """``clip_grad_by_total_norm_fp32`` without its CUDA tensor-type assertion (patch 5)."""
    attr = "decoupled_grad" if use_decoupled_grad else "grad"
    grads = [getattr(p, attr).detach() for p in parameters if getattr(p, attr, None) is not None]
    clip_coeff = max_norm / (total_norm + 1.0e-6)
    if clip_coeff < 1.0 and grads:
        torch._foreach_mul_(grads, clip_coeff)


_applied = False


def apply_cpu_patches() -> bool:
    """Apply the patches above if CUDA is absent. Idempotent; returns whether they are active."""
    global _applied
    if torch.cuda.is_available():
        return False
    if _applied:
        return True
    for module_name in _CUDA_DEVICE_MODULES:
        importlib.import_module(module_name).torch = _CPU_TORCH

    from megatron.core.tensor_parallel import random as mrandom

    tracker_cls = type("CpuRNGStatesTracker", (CpuRNGStatesTracker, mrandom.CudaRNGStatesTracker),
                       {"__doc__": CpuRNGStatesTracker.__doc__})
    mrandom.CudaRNGStatesTracker = tracker_cls
    mrandom._get_cuda_rng_state = lambda device="cuda", clone=False, graph_safe=False: (
        torch.get_rng_state())
    mrandom._set_cuda_rng_state = lambda new_state, device=-1, graph_safe=False: (
        torch.set_rng_state(new_state))
    # A tracker created before the patch (by an earlier import) would be upstream's class.
    mrandom.initialize_rng_tracker(force_reset=True)

    from megatron.core.transformer.moe import moe_utils

    if not megatron_version.at_least(0, 17) and not moe_utils.HAVE_TE:
        moe_utils.te_general_gemm = None

    from megatron.core.transformer import torch_norm

    torch_norm.WrappedTorchNorm.__new__ = _cpu_norm_new

    from megatron.core.optimizer import optimizer as moptimizer

    moptimizer.clip_grad_by_total_norm_fp32 = _cpu_clip_grad_by_total_norm_fp32
    _patch_mla_have_te()
    _applied = True
    return True


def _patch_mla_have_te() -> None:
    """Patch 6: megatron-core 0.16.1's ``multi_latent_attention`` sets ``HAVE_TE = True`` when its
    TE-extension import succeeds, which it does without Transformer Engine (the names come back as
    placeholder objects, not classes); ``isinstance(self.linear_proj, TELinear)`` then raises.
    Without TE the flag must be False (0.19 reads it from the extension module, where it is)."""
    from megatron.core.transformer import multi_latent_attention as mla

    if mla.HAVE_TE and not isinstance(mla.TELinear, type):
        mla.HAVE_TE = False
    if mla.Linear is None:
        # 0.19 without TE leaves the replicated Linear it accepts for the down projections None;
        # moerl's local MLA spec (moerl.trainer.mla_attention) uses that Linear.
        from megatron.core.post_training.modelopt.layers import Linear

        mla.Linear = Linear


def check_cpu_config(*, token_dispatcher: str) -> None:
    """Refuse Megatron settings that cannot run without CUDA, saying what to use instead."""
    if torch.cuda.is_available():
        return
    if token_dispatcher != "allgather":
        raise ValueError(
            f"model.token_dispatcher={token_dispatcher!r} needs CUDA (megatron's all-to-all "
            "dispatcher creates CUDA streams); on CPU set model.token_dispatcher=allgather")
