"""Which megatron-core releases moerl runs on, and the start-up check that refuses the others.

moerl drives Megatron internals (``RouterReplay`` by class swap, the CPU patches of
``moerl.trainer.cpu_compat``, DDP's ``main_grad`` buffers, the optimizer's ``prepare_grads`` /
``step_with_ready_grads``). Each is tested against the releases below and no other, so any other
version is refused at start-up with the supported ones named, instead of failing deep inside a
forward pass or, worse, training wrongly.

- 0.19 series (0.19.2 tested) on Python >= 3.12: the primary stack (megatron-core 0.17 and later
  require Python 3.12).
- 0.16 series (0.16.1 tested) on Python 3.10/3.11: 0.16.1 is the first release with
  ``RouterReplay`` and the last one that installs on Python 3.10/3.11.

The installed version is read from the package metadata: importing megatron takes seconds, and
0.19's ``package_info`` runs ``git`` at import time. :func:`import_megatron` checks the version
first and then imports megatron-core with its ``torch.compile`` decorations deferred to their first
call (see there): the entry points call it before anything else of Megatron.
"""

from __future__ import annotations

import contextlib
import functools
import importlib
import importlib.metadata
import re
import sys
from dataclasses import dataclass

_RELEASE = re.compile(r"^\s*(\d+)\.(\d+)(?:\.(\d+))?")


@dataclass(frozen=True)
class SupportedSeries:
    """One supported minor series of megatron-core: ``tested <= version < (major, minor + 1)``."""

    tested: tuple[int, int, int]  # the release the suite runs on, and the lowest one accepted
    python: str  # the Python versions this series installs on

    @property
    def upper(self) -> tuple[int, int, int]:
        return (self.tested[0], self.tested[1] + 1, 0)

    def accepts(self, version: tuple[int, int, int]) -> bool:
        return self.tested <= version < self.upper

    def describe(self) -> str:
        return f"{_dotted(self.tested)} (<{_dotted(self.upper[:2])}, Python {self.python})"


SUPPORTED_SERIES: tuple[SupportedSeries, ...] = (
    SupportedSeries(tested=(0, 19, 2), python=">=3.12"),
    SupportedSeries(tested=(0, 16, 1), python="3.10/3.11"),
)


class UnsupportedMegatronError(RuntimeError):
    """megatron-core is missing or of a release moerl is not tested on."""


def _dotted(release: tuple[int, ...]) -> str:
    return ".".join(str(part) for part in release)


def parse_release(version: str) -> tuple[int, int, int]:
    """``"0.19.2+dfb1323"`` -> ``(0, 19, 2)``; pre-release and local tags are dropped."""
    match = _RELEASE.match(version)
    if match is None:
        raise ValueError(f"cannot read a release number from megatron-core version {version!r}")
    major, minor, patch = match.groups()
    return int(major), int(minor), int(patch or 0)


@functools.cache
def installed_version() -> str | None:
    """The installed megatron-core's version string, or None when it is not installed."""
    try:
        return importlib.metadata.version("megatron-core")
    except importlib.metadata.PackageNotFoundError:
        return None


def at_least(major: int, minor: int, patch: int = 0) -> bool:
    """Whether the installed megatron-core is at least the given release (raises
    :class:`UnsupportedMegatronError` when it is not a supported one)."""
    return check_megatron_version() >= (major, minor, patch)


def check_megatron_version(version: str | None = None) -> tuple[int, int, int]:
    """Raise :class:`UnsupportedMegatronError` naming the supported releases unless ``version``
    (default: the installed megatron-core) is one of them; return its ``(major, minor, patch)``."""
    version = installed_version() if version is None else version
    supported = " or ".join(series.describe() for series in SUPPORTED_SERIES)
    fix = ("run launch/setup.sh (it builds .venv with the right pair), or install "
           + " / ".join(f"'megatron-core=={_dotted(s.tested)}' on Python {s.python}"
                        for s in SUPPORTED_SERIES))
    if version is None:
        raise UnsupportedMegatronError(
            f"megatron-core is not installed; moerl supports megatron-core {supported}: {fix}")
    release = parse_release(version)
    if not any(series.accepts(release) for series in SUPPORTED_SERIES):
        raise UnsupportedMegatronError(
            f"megatron-core {version} is installed, but moerl is tested on, and supports, only "
            f"megatron-core {supported}: {fix}")
    return release


def import_megatron() -> None:
    """Check the installed megatron-core (:func:`check_megatron_version`), then import it, its
    ``torch.compile`` decorations deferred to their first call.

    megatron-core's ``jit_fuser`` is ``torch.compile``, and modules that ``megatron.core`` imports
    unconditionally (``fusions.fused_bias_geglu`` and others) apply it at import time. Wrapping a
    function in ``torch.compile`` compiles nothing until the first call, but it imports TorchDynamo
    and Inductor (with sympy): about 4 s of CPU in every process that imports Megatron, a third of
    that import (measured on 0.19.2 with torch 2.13: 12.0 -> 8.2 CPU seconds), for fusions a CPU
    run never calls (moerl turns Megatron's fusions off on CPU). During the import
    ``torch.compile`` is :func:`_compile_on_first_call`, which makes the same ``torch.compile``
    call on first use; afterwards ``torch.compile`` is restored. A no-op once megatron-core is
    imported.
    """
    check_megatron_version()
    if "megatron.core" in sys.modules:
        return
    with _torch_compile_deferred():
        importlib.import_module("megatron.core")


@contextlib.contextmanager
def _torch_compile_deferred():
    import torch

    real = torch.compile
    torch.compile = functools.partial(_compile_on_first_call, real)
    try:
        yield
    finally:
        torch.compile = real


def _compile_on_first_call(compile_fn, model=None, **options):
    """``compile_fn(model, **options)`` made on the first call of the result instead of now (a
    decorator with or without options, as ``torch.compile``). Modules are compiled at once: their
    compiled form is an object with its own attributes, not a function."""
    import torch

    if model is None:
        return functools.partial(_compile_on_first_call, compile_fn, **options)
    if isinstance(model, torch.nn.Module):
        return compile_fn(model, **options)
    compiled = None

    @functools.wraps(model)
    def call(*args, **kwargs):
        nonlocal compiled
        if compiled is None:
            compiled = compile_fn(model, **options)
        return compiled(*args, **kwargs)

    return call
