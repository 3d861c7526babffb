"""The trainer's side of the rollout wire does not load the built-in server's engine."""

import subprocess
import sys


def test_the_trainer_side_imports_neither_the_engine_nor_transformers():
    code = ("import sys, moerl.rollout_manager, moerl.custom_rollout\n"
            "heavy = sorted(m for m in sys.modules if m.split('.')[0] == 'transformers'\n"
            "               or m in ('moerl.rollout.engine', 'moerl.rollout.server'))\n"
            "print(heavy)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=120, check=True).stdout.strip()
    assert out == "[]"  # e.g. a trainer rank talking to SGLang: no engine, no transformers
