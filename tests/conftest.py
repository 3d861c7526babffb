import pytest


@pytest.fixture(scope="session")
def warm_model(tmp_path_factory):
    """A tiny Qwen3-MoE warm-started on arithmetic until it is right about a quarter of the time
    (the same procedure as launch/local.sh, with a lower target to keep the suite fast)."""
    from moerl.tasks.arithmetic import ArithmeticTask
    from moerl.warmstart import warm_start

    out = tmp_path_factory.mktemp("warm") / "hf"
    warm_start(out, task=ArithmeticTask(max_operand=30, seed=7), target_accuracy=0.25,
               log=lambda *_: None)
    return out
