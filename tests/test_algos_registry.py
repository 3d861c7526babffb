"""One registry contract: every advantage estimator (GAE included), policy loss, KL estimator,
aggregation and rollout correction is a registry entry with its registry's one call signature;
the config's choices are the registries' names; ``objective.py`` never branches on a name."""

import ast
import inspect
import typing
from pathlib import Path

import pytest

from moerl.algos import (
    ADVANTAGE_ESTIMATORS,
    AGGREGATIONS,
    CRITIC_ESTIMATORS,
    KL_ESTIMATORS,
    POLICY_LOSSES,
    ROLLOUT_CORRECTIONS,
)
from moerl.config import AlgorithmConfig

REGISTRIES = {
    "advantage": ADVANTAGE_ESTIMATORS,
    "policy_loss": POLICY_LOSSES,
    "aggregation": AGGREGATIONS,
    "kl_estimator": KL_ESTIMATORS,
    "rollout_correction": ROLLOUT_CORRECTIONS,
}
OFF_SWITCHES = {"kl_estimator": ("none",)}  # "no KL term" is the absence of an estimator


@pytest.mark.parametrize("field", sorted(REGISTRIES))
def test_config_choices_are_the_registry_names(field):
    choices = typing.get_args(typing.get_type_hints(AlgorithmConfig)[field])
    assert set(choices) == set(OFF_SWITCHES.get(field, ())) | set(REGISTRIES[field])
    assert len(choices) == len(set(choices))


def _signature(entry):
    fn = entry if inspect.isfunction(entry) else entry.__call__
    params = list(inspect.signature(fn).parameters.values())
    if params and params[0].name == "self":
        params = params[1:]
    return [(p.name, p.kind) for p in params]


@pytest.mark.parametrize("name", sorted(REGISTRIES))
def test_every_entry_has_the_registry_signature(name):
    signatures = {key: _signature(entry) for key, entry in REGISTRIES[name].items()}
    first = next(iter(signatures.values()))
    assert all(sig == first for sig in signatures.values()), signatures


def test_critic_estimators_are_registry_names():
    assert CRITIC_ESTIMATORS <= set(ADVANTAGE_ESTIMATORS) and "gae" in CRITIC_ESTIMATORS


def test_objective_never_switches_on_a_registry_name():
    source = (Path(__file__).resolve().parents[1] / "moerl/objective.py").read_text()
    names = set().union(*REGISTRIES.values(), *OFF_SWITCHES.values())
    switched = [
        (node.lineno, const.value)
        for node in ast.walk(ast.parse(source))
        if isinstance(node, ast.Compare) or (isinstance(node, ast.Call)
                                             and getattr(node.func, "attr", "") == "startswith")
        for const in ast.walk(node)
        if isinstance(const, ast.Constant) and const.value in names
    ]
    assert switched == []
