"""Every change moerl makes to SGLang 0.5.23's environment to run it on a CPU, in one place.

Run with the SGLang venv's python (``launch/setup_sglang.sh`` does):

    python launch/sglang_cpu/shims.py requirements   # SGLang's own requirements minus the CUDA ones
    python launch/sglang_cpu/shims.py apply          # apply every shim (idempotent)
    python launch/sglang_cpu/shims.py check          # fail loudly unless every shim is in place

Each shim names its reason and the upstream version it targets. A source patch is an exact text
replacement: if the upstream text is neither the original nor the patched one (upstream changed
under it), ``apply`` and ``check`` fail and name the file, so nobody runs a silently unpatched or
mis-patched server.
"""

import dataclasses
import importlib.metadata
import os
import pathlib
import re
import shutil
import sys

SGLANG_VERSION = "0.5.23"
TORCH_VERSION = "2.13.0"
HERE = pathlib.Path(__file__).resolve().parent

# SGLang 0.5.23's requirements that are CUDA/GPU-kernel builds (or pin a CUDA torch), left out of
# the CPU environment. torch itself is installed first, pinned to the CPU build.
CUDA_ONLY_REQUIREMENTS = (
    "torch",
    "torchaudio",
    "torchcodec",
    "torch_memory_saver",
    "cuda-python",
    "sglang-kernel",
    "flashinfer_python",
    "flash-attn-4",
    "humming-kernels",
    "nvidia-cutlass-dsl",
    "nvidia-mathdx",
    "nvshmem4py-cu13",
    "quack-kernels",
    "sgl-deep-ep",
    "sgl-deep-gemm",
    "sgl-flash-mla",
    "tilelang",
    "apache-tvm-ffi",
)


@dataclasses.dataclass(frozen=True)
class SourcePatch:
    """An exact text replacement in an installed package's file."""

    distribution: str
    """The installed distribution the file belongs to."""
    version: str
    """The distribution version the patch was written against."""
    relpath: str
    """Path inside site-packages."""
    original: str
    patched: str
    reason: str


PATCHES = (
    SourcePatch(
        distribution="sglang",
        version=SGLANG_VERSION,
        relpath="sglang/srt/mem_cache/pool_host/common.py",
        original="    if pin_memory:\n        _cuda_host_register(buffer, registration_granularity_bytes)\n",
        patched=(
            "    if pin_memory and torch.cuda.is_available():  # moerl CPU shim\n"
            "        _cuda_host_register(buffer, registration_granularity_bytes)\n"
        ),
        reason=(
            "--enable-return-routed-experts on --device cpu allocates pinned host buffers and calls "
            "cudaHostRegister, which crashes at start-up without CUDA (SGLang 0.5.23 bug)"
        ),
    ),
    SourcePatch(
        distribution="torchvision",
        version="0.28.0",
        relpath="torchvision/_meta_registrations.py",
        original='@torch.library.register_fake("torchvision::{op}")\n',
        patched=(
            '@(torch.library.register_fake("torchvision::{op}") if torchvision.extension._has_ops()'
            " else (lambda fn: fn))  # moerl CPU shim\n"
        ),
        reason=(
            "timm (an SGLang requirement) pulls in the PyPI torchvision, whose compiled ops do not "
            "load with a CPU torch; its unconditional fake registrations for nms/qnms then fail at "
            "import. Guarded only where torchvision's ops are absent"
        ),
    ),
    SourcePatch(
        distribution="sglang",
        version=SGLANG_VERSION,
        relpath="sglang/srt/models/qwen2_moe.py",
        original=(
            "            and not use_intel_amx_backend(self.shared_expert_gate)\n"
            "            and not is_npu()\n"
            "        )\n"
        ),
        patched=(
            "            and not use_intel_amx_backend(self.shared_expert_gate)\n"
            "            and not is_npu()\n"
            "            and not _is_cpu  # moerl CPU shim\n"
            "        )\n"
        ),
        reason=(
            "Qwen2-MoE's shared-expert gate takes the Triton kernel fused_gate_sigmoid_mul_add on "
            "a CPU without AMX, and the first forward (the warm-up) fails with 'RuntimeError: 0 "
            "active drivers ([]). There should only be one.' (SGLang 0.5.23); the patch keeps the "
            "CPU on the module's own unfused path, sigmoid(shared_expert_gate(x)) * "
            "shared_expert(x) added to the routed experts' output, as transformers computes it"
        ),
    ),
    SourcePatch(
        distribution="sglang",
        version=SGLANG_VERSION,
        relpath="sglang/srt/models/deepseek_common/attention_backend_handler.py",
        original='AttentionBackendRegistry.register("intel_xpu", handle_attention_intel_xpu)\n',
        patched=(
            'AttentionBackendRegistry.register("intel_xpu", handle_attention_intel_xpu)\n'
            'AttentionBackendRegistry.register("torch_native", _dispatch_mla_subtype)'
            "  # moerl CPU shim\n"
        ),
        reason=(
            "MLA (DeepSeek-V3) under --attention-backend torch_native: no handler is registered "
            "for it, so SGLang falls back to triton's, which runs a fresh prefill on the "
            "non-absorbed (MHA) path; that path passes the decompressed k/v with "
            "save_kv_cache=False, but the torch_native backend's forward_extend ignores the k/v "
            "it is given and attends over the KV cache, which holds MLA's compressed latent: "
            "every prefill token attends to the wrong keys and values, silently where the shapes "
            "fit (log-probs off by up to 0.31, routes 0.74, on a tiny model with "
            "qk_nope_head_dim == kv_lora_rank). The patch sends torch_native to the absorbed MLA "
            "path, which reads the latent cache as it is meant to, for prefill as for decode"
        ),
    ),
)
TORCHVISION_OPS = ("nms", "qnms")


class ShimError(RuntimeError):
    pass


def _site_packages():
    return pathlib.Path(importlib.metadata.distribution("sglang").locate_file(""))


def _expand(patch):
    """(original, patched) text pairs of one patch (the torchvision one covers two ops)."""
    if "{op}" not in patch.original:
        return [(patch.original, patch.patched)]
    return [(patch.original.format(op=op), patch.patched.format(op=op)) for op in TORCHVISION_OPS]


def _check_version(distribution, wanted):
    have = importlib.metadata.version(distribution).split("+")[0]  # 2.13.0+cpu is 2.13.0
    if have != wanted:
        raise ShimError(
            f"{distribution} {have} is installed, but moerl's CPU shims target {wanted}: re-check "
            f"every shim in {__file__} against the new version before changing the pin"
        )


def _patch_state(patch, text):
    """'original', 'patched', or raise when the file matches neither."""
    pairs = _expand(patch)
    if all(text.count(new) == 1 for _, new in pairs):
        return "patched"
    if all(text.count(old) == 1 for old, _ in pairs):
        return "original"
    raise ShimError(
        f"{patch.relpath} ({patch.distribution} {patch.version}) has neither the original nor the "
        f"patched text of moerl's shim; upstream changed under it. Reason for the shim: "
        f"{patch.reason}"
    )


def apply_patch(patch):
    _check_version(patch.distribution, patch.version)
    path = _site_packages() / patch.relpath
    text = path.read_text()
    if _patch_state(patch, text) == "patched":
        return
    for old, new in _expand(patch):
        text = text.replace(old, new)
    # A new file in place of the old one, never a write into it: venvs copied with hard links
    # (cp -al) share the old file, and patching one must not patch the others behind their backs.
    tmp = path.with_name(path.name + ".moerl-tmp")
    tmp.write_text(text)
    shutil.copymode(path, tmp)
    os.replace(tmp, path)
    for cache in path.parent.glob(f"__pycache__/{path.stem}.*.pyc"):
        cache.unlink()


def install_sgl_kernel_standin():
    target = _site_packages() / "sgl_kernel"
    try:
        real = importlib.metadata.distribution("sglang-kernel")
    except importlib.metadata.PackageNotFoundError:
        real = None
    if real is not None:
        raise ShimError("the real sglang-kernel is installed; remove it or do not use the stand-in")
    shutil.rmtree(target, ignore_errors=True)
    shutil.copytree(HERE / "sgl_kernel", target, ignore=shutil.ignore_patterns("__pycache__"))


def check():
    """Raise unless the environment is exactly the one the shims were written for."""
    _check_version("sglang", SGLANG_VERSION)
    _check_version("torch", TORCH_VERSION)
    import torch

    if torch.version.cuda is not None:
        raise ShimError(f"torch {torch.__version__} is a CUDA build; the SGLang CPU venv needs the CPU wheel")
    for patch in PATCHES:
        _check_version(patch.distribution, patch.version)
        path = _site_packages() / patch.relpath
        if _patch_state(patch, path.read_text()) != "patched":
            raise ShimError(f"{path} is not patched: run launch/setup_sglang.sh")
    import sgl_kernel

    if getattr(sgl_kernel, "__version__", "") != "0.0.0+moerl.cpu.standin":
        raise ShimError(f"sgl_kernel at {sgl_kernel.__file__} is not moerl's CPU stand-in")
    _check_upstream_kernel_use()
    _check_cpu_path()


def _check_upstream_kernel_use():
    """The stand-in implements one symbol: fail if SGLang's CPU allocator imports anything else."""
    path = _site_packages() / "sglang/srt/mem_cache/allocation.py"
    imported = re.findall(r"from sgl_kernel import (\w+)", path.read_text())
    if imported != ["assign_req_to_token_pool_cpu"]:
        raise ShimError(
            f"{path} now imports {imported} from sgl_kernel; the CPU stand-in implements only "
            "assign_req_to_token_pool_cpu: extend it (launch/sglang_cpu/sgl_kernel)"
        )


def _check_cpu_path():
    """The stand-in is only sound where SGLang's CPU path uses plain PyTorch layers (no AMX)."""
    from sglang.srt.utils import cpu_has_amx_support

    if cpu_has_amx_support():
        raise ShimError(
            "this CPU has AMX, so SGLang's CPU path calls compiled sgl-kernel CPU ops that moerl's "
            "stand-in does not provide; build sgl-kernel for CPU instead"
        )


def requirements():
    """SGLang's own unconditional requirements, minus the CUDA-only ones, one per line."""
    from packaging.requirements import Requirement

    requires = importlib.metadata.requires("sglang") or []
    kept, dropped = [], set()
    for line in requires:
        req = Requirement(line)
        if req.marker is not None and not req.marker.evaluate({"extra": ""}):
            continue
        name = req.name.lower().replace("_", "-")
        if name in {n.lower().replace("_", "-") for n in CUDA_ONLY_REQUIREMENTS}:
            dropped.add(name)
            continue
        kept.append(str(req).split(";")[0].strip())
    missing = {n.lower().replace("_", "-") for n in CUDA_ONLY_REQUIREMENTS} - dropped
    if missing:
        raise ShimError(f"sglang no longer requires {sorted(missing)}: re-check CUDA_ONLY_REQUIREMENTS")
    return kept


def main(argv):
    if argv == ["requirements"]:
        print("\n".join(requirements()))
    elif argv == ["apply"]:
        for patch in PATCHES:
            apply_patch(patch)
        install_sgl_kernel_standin()
        check()
    elif argv == ["check"]:
        check()
    else:
        raise SystemExit(f"usage: {sys.argv[0]} requirements|apply|check")


if __name__ == "__main__":
    try:
        main(sys.argv[1:])
    except ShimError as err:
        raise SystemExit(f"moerl SGLang CPU shims: {err}") from None
