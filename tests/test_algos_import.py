"""The algorithm modules must import with megatron and sglang unavailable."""

import pkgutil
import subprocess
import sys

import moerl.algos

BLOCKED_IMPORT_CHECK = r"""
import importlib, importlib.abc, sys

BLOCKED = ("megatron", "sglang", "transformer_engine", "apex")

class Block(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in BLOCKED:
            raise ImportError(f"blocked import of {name}")
        return None

sys.meta_path.insert(0, Block())
for name in list(sys.modules):
    if name.split(".")[0] in BLOCKED:
        del sys.modules[name]
try:
    import megatron.core
except ImportError:
    pass
else:
    raise SystemExit("the import blocker does not work")

for module in sys.argv[1:]:
    importlib.import_module(module)
loaded = sorted(n for n in sys.modules if n.split(".")[0] in BLOCKED)
if loaded:
    raise SystemExit(f"blocked packages ended up in sys.modules: {loaded}")
print("ok", len(sys.argv) - 1)
"""


def test_algos_import_without_megatron_or_sglang():
    modules = ["moerl.algos"] + [
        f"moerl.algos.{m.name}" for m in pkgutil.iter_modules(moerl.algos.__path__)
    ]
    assert "moerl.algos.policy_losses" in modules
    result = subprocess.run(
        [sys.executable, "-c", BLOCKED_IMPORT_CHECK, *modules],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.strip() == f"ok {len(modules)}"
