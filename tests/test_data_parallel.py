"""Data-parallel plumbing: host collectives survive the GPU init, rows partition, no import
cycles."""

from __future__ import annotations

import ast
import json
import sys
from pathlib import Path

import pytest

from e2e_util import REPO, run
from moerl.data_parallel import DataParallel


def _host_collectives(backend: str) -> dict:
    proc = run([sys.executable, "-m", "torch.distributed.run", "--standalone",
                "--nproc_per_node=2", "tests/dist/host_collectives.py", "--backend", backend],
               timeout=240, check=False)
    lines = [line for line in proc.stdout.splitlines() if line.startswith("{")]
    assert lines, proc.stdout[-2000:] + proc.stderr[-4000:]
    return json.loads(lines[-1])


def test_host_collectives_pass_the_groups_init_builds_when_cuda_is_present():
    """With CUDA reported present, init_parallel's groups carry the loop's host tensors; the
    stand-in for NCCL (a CUDA-only backend) as the only backend, as before the fix, does not."""
    fixed = _host_collectives("default")
    assert fixed["error"] is None, fixed
    assert fixed["passed"] == ["broadcast_json", "broadcast_batch", "dp.gather_rows",
                               "dp.reduce_metrics"]
    assert fixed["backend"].startswith("cpu:gloo,") and fixed["dp_backend"] == fixed["backend"]
    cuda_only = _host_collectives("cuda-only")
    assert cuda_only["passed"] == [], cuda_only
    assert "device type cpu" in cuda_only["error"], cuda_only


@pytest.mark.parametrize("num_rows,size", [(8, 1), (8, 2), (10, 4), (3, 4)])
def test_owned_rows_partition_the_batch(num_rows, size):
    ranks = [DataParallel(size=size, rank=r, group=None) for r in range(size)]
    rows = sorted(r for dp in ranks for r in dp.owned_rows(num_rows).tolist())
    assert rows == list(range(num_rows))


def _moerl_import_graph() -> dict[str, set[str]]:
    root = REPO / "moerl"
    modules = {}
    for path in root.rglob("*.py"):
        name = ".".join(path.relative_to(REPO).with_suffix("").parts).removesuffix(".__init__")
        modules[name] = path
    graph = {}
    for name, path in modules.items():
        deps = set()
        for node in ast.walk(ast.parse(Path(path).read_text())):
            if isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                targets = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
            else:
                continue
            deps.update(t for t in targets if t in modules and t != name)
        graph[name] = deps
    return graph


def _cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle (function-level imports included), or None."""
    state: dict[str, int] = {}  # 1 on the stack, 2 done
    stack: list[str] = []

    def visit(node):
        state[node], _ = 1, stack.append(node)
        for dep in sorted(graph[node]):
            if state.get(dep) == 1:
                return stack[stack.index(dep):] + [dep]
            if dep not in state and (found := visit(dep)):
                return found
        state[node], _ = 2, stack.pop()
        return None

    for node in sorted(graph):
        if node not in state and (found := visit(node)):
            return found
    return None


def test_moerl_has_no_import_cycles():
    graph = _moerl_import_graph()
    assert "moerl.data_parallel" in graph and "moerl.dpo" in graph
    assert _cycle(graph) is None, " -> ".join(_cycle(graph))
    assert _cycle({"a": {"b"}, "b": {"a"}}) == ["a", "b", "a"]
