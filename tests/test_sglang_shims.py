"""The SGLang CPU shims (launch/sglang_cpu): the sgl_kernel stand-in's semantics, and that a shim
fails loudly when upstream text changes under it. CPU-only, no SGLang needed; the check of an
installed environment runs in SGLang's venv (marked ``sglang``)."""

from __future__ import annotations

import importlib.util
import subprocess
import sys

import pytest
import torch

from e2e_util import REPO
from sglang_util import require_sglang_python

SHIMS = REPO / "launch" / "sglang_cpu"


def load(name, path):
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def standin():
    return load("sgl_kernel_standin", SHIMS / "sgl_kernel" / "__init__.py")


@pytest.fixture(scope="module")
def shims():
    return load("moerl_sglang_shims", SHIMS / "shims.py")


def test_standin_assigns_new_slots_in_batch_order(standin):
    req_to_token = torch.full((4, 10), -1, dtype=torch.int32)
    standin.assign_req_to_token_pool_cpu(
        torch.tensor([2, 0]), req_to_token, torch.tensor([1, 0]), torch.tensor([4, 2]),
        torch.tensor([10, 11, 12, 13, 14], dtype=torch.int64), 10)
    assert req_to_token[2].tolist() == [-1, 10, 11, 12] + [-1] * 6
    assert req_to_token[0].tolist() == [13, 14] + [-1] * 8
    assert (req_to_token[[1, 3]] == -1).all()


def test_standin_fails_loudly_for_any_other_kernel(standin):
    from_import = standin.fused_add_rmsnorm  # importable, so SGLang's module imports still work
    with pytest.raises(NotImplementedError, match="sgl_kernel.fused_add_rmsnorm"):
        from_import(torch.zeros(1))
    with pytest.raises(AttributeError):
        standin.__wrapped__


def test_a_source_patch_refuses_upstream_text_it_does_not_know(shims):
    patch = shims.PATCHES[0]
    original = "x = 1\n" + patch.original + "y = 2\n"
    assert shims._patch_state(patch, original) == "original"
    patched = original.replace(patch.original, patch.patched)
    assert shims._patch_state(patch, patched) == "patched"
    with pytest.raises(shims.ShimError, match="upstream changed under it"):
        shims._patch_state(patch, original.replace("if pin_memory:", "if pin_memory or x:"))
    tv = shims.PATCHES[1]
    text = "".join(tv.original.format(op=op) + "def f(): pass\n" for op in shims.TORCHVISION_OPS)
    assert shims._patch_state(tv, text) == "original"
    with pytest.raises(shims.ShimError):  # only one of the two registrations is there
        shims._patch_state(tv, tv.original.format(op="nms"))


@pytest.mark.sglang
def test_installed_sglang_environment_passes_the_shim_check():
    python = require_sglang_python()
    # Importing SGLang's modules took over 300 s with the 2-core machine's load average at ~30.
    out = subprocess.run([str(python), str(SHIMS / "shims.py"), "check"], capture_output=True,
                         text=True, timeout=1200)
    assert out.returncode == 0, out.stderr[-3000:]
