"""The supported megatron-core releases, and the start-up refusal of every other one."""

from __future__ import annotations

import subprocess
import sys

import pytest
from e2e_util import REPO

from moerl.trainer import megatron_version
from moerl.trainer.megatron_version import (UnsupportedMegatronError, check_megatron_version,
                                            parse_release)

pytestmark = pytest.mark.compat


@pytest.mark.parametrize("version, release", [
    ("0.16.1", (0, 16, 1)), ("0.19.2+dfb1323", (0, 19, 2)), ("0.19.3rc1", (0, 19, 3)),
    ("0.20", (0, 20, 0)),
])
def test_parse_release(version, release):
    assert parse_release(version) == release


@pytest.mark.parametrize("version", ["0.16.1", "0.16.4", "0.19.2", "0.19.2+dfb1323", "0.19.5"])
def test_supported_releases_pass(version):
    assert check_megatron_version(version) == parse_release(version)


@pytest.mark.parametrize("version", ["0.15.3", "0.16.0", "0.17.0", "0.18.1", "0.19.1", "0.20.0",
                                     "1.0.0"])
def test_other_releases_are_refused_naming_the_supported_ones(version):
    with pytest.raises(UnsupportedMegatronError) as err:
        check_megatron_version(version)
    message = str(err.value)
    assert f"megatron-core {version} is installed" in message
    assert "0.19.2 (<0.20, Python >=3.12)" in message
    assert "0.16.1 (<0.17, Python 3.10/3.11)" in message
    assert "launch/setup.sh" in message


def test_installed_release_is_supported_and_read_without_importing_megatron():
    script = ("import sys; from moerl.trainer.megatron_version import check_megatron_version; "
              "print(check_megatron_version()); assert 'megatron' not in sys.modules")
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                          timeout=500)
    assert proc.returncode == 0, proc.stderr[-2000:]
    release = tuple(int(x) for x in proc.stdout.strip().strip("()").split(","))
    assert release in [series.tested for series in megatron_version.SUPPORTED_SERIES]


@pytest.fixture
def untested_megatron(tmp_path):
    """A site directory whose megatron-core metadata says 0.18.0: first on ``sys.path``, it is the
    distribution ``importlib.metadata`` finds, as if that release were installed."""
    info = tmp_path / "megatron_core-0.18.0.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: megatron-core\n"
                                   "Version: 0.18.0\n")
    return {"PYTHONPATH": str(tmp_path), "PATH": "/usr/bin:/bin"}


@pytest.mark.parametrize("module", ["moerl.launch_info", "moerl.train"])
def test_start_up_refuses_an_untested_release(untested_megatron, module):
    proc = subprocess.run([sys.executable, "-m", module, "configs/grpo.yaml"], cwd=REPO,
                          env=untested_megatron, capture_output=True, text=True, timeout=500)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert proc.stdout == ""
    assert "megatron-core 0.18.0 is installed" in proc.stderr
    assert "0.19.2" in proc.stderr and "0.16.1" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_import_megatron_defers_torch_compile_to_the_first_call():
    """megatron-core applies ``torch.compile`` (its ``jit_fuser``) at import; moerl's import makes
    those decorations compile on first call, so TorchDynamo/Inductor are not imported with it.
    Fails if upstream stops doing so (then the deferral is stale) or if the deferral leaks."""
    script = (
        "import sys, torch\n"
        "real = torch.compile\n"
        "from moerl.trainer.megatron_version import import_megatron\n"
        "import_megatron()\n"
        "import megatron.core.jit as jit\n"
        "assert torch.compile is real, 'torch.compile not restored'\n"
        "assert getattr(jit.jit_fuser, 'func', None).__name__ == '_compile_on_first_call', "
        "jit.jit_fuser\n"
        "assert 'torch._dynamo' not in sys.modules and 'torch._inductor' not in sys.modules\n")
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                          timeout=500)
    assert proc.returncode == 0, proc.stderr[-3000:]


def test_deferred_compile_makes_the_same_call_once_on_first_use():
    calls = []

    def fake_compile(model, **options):
        calls.append((model, options))
        return lambda *args: ("compiled", model(*args))

    def double(x):
        return 2 * x

    deferred = megatron_version._compile_on_first_call(fake_compile, double)
    assert calls == [] and deferred.__name__ == "double"
    assert deferred(3) == ("compiled", 6) and deferred(4) == ("compiled", 8)
    assert calls == [(double, {})]
    # As a decorator with options, as megatron uses torch.compile(...)(fn) too.
    with_options = megatron_version._compile_on_first_call(fake_compile, mode="max-autotune")
    assert with_options(double)(5) == ("compiled", 10)
    assert calls[-1] == (double, {"mode": "max-autotune"})
    # Modules are compiled at once (their compiled form is an object, not a function).
    import torch

    linear = torch.nn.Linear(2, 2)
    megatron_version._compile_on_first_call(fake_compile, linear)
    assert calls[-1] == (linear, {})
