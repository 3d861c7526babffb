import pytest
import torch
from e2e_util import cached_warm_start

# The longest test files (wall time measured with pytest --durations on the 2-core machine, both
# steps of tools/test.sh), longest first. pytest-xdist (tools/test.sh: --dist loadfile or
# loadscope, --no-loadscope-reorder) hands out files (classes) in collection order as workers free
# up; a long file collected last kept one worker busy while the other idled at the end of a step.
LONG_FILES = (
    "test_train_reliability.py", "test_train_e2e.py", "test_rollout_fleet.py",
    "test_byo_e2e.py", "test_batch_transport.py", "test_learning.py", "test_families.py",
    "test_rollout_router.py", "test_routing_replay.py",
    "test_sglang_rl.py", "test_sglang_server.py", "test_sglang_loop.py", "test_sglang_fleet.py",
    "test_sglang_families.py",
)


def pytest_collection_modifyitems(config, items):
    """Collect the long files first (their own order inside each file is kept)."""
    first = {name: i for i, name in enumerate(LONG_FILES)}
    items.sort(key=lambda item: first.get(item.path.name, len(first)))


@pytest.fixture(scope="session")
def warm_model(tmp_path_factory):
    """The main job's model, the all-MoE tiny Qwen3-MoE (``tiny_moe``, which a real SGLang
    server can serve too), warm-started on arithmetic until it is right about a quarter of the
    time (the procedure of launch/local.sh, with a lower target to keep the suite fast)."""
    return cached_warm_start(tmp_path_factory, "warm25", target_accuracy=0.25, variant="tiny_moe")


@pytest.fixture(scope="module")
def one_torch_thread():
    """One intra-op thread: the tiny model's matmuls are far too small for more, and on a shared
    2-core machine extra OpenMP threads only spin. Restored afterwards."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    """A random tiny Qwen3-MoE checkpoint (no warm start), one per test module."""
    from moerl.tiny_model import create_tiny_hf_model

    return create_tiny_hf_model(tmp_path_factory.mktemp("tiny"), seed=0)
