import pytest
import torch
from e2e_util import cached_warm_start


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
