"""Config tree: YAML includes, --set overrides, first-class flags, validation, documentation."""

import dataclasses
import textwrap
import typing

import pytest

from moerl import config as C
from moerl.config import Config, ConfigError, load_config


def write(tmp_path, name, text):
    path = tmp_path / name
    path.write_text(textwrap.dedent(text))
    return path


def test_defaults_validate():
    cfg = load_config()
    assert cfg.algorithm.routing_replay == "none" and cfg.rollout.group_size >= 2


def test_yaml_include_and_override_order(tmp_path):
    write(tmp_path, "base.yaml", """
        training: {lr: 1.0e-4, steps: 3}
        rollout: {top_p: 0.9}
    """)
    top = write(tmp_path, "top.yaml", """
        include: base.yaml
        training: {steps: 5}
    """)
    cfg = load_config([top], ["training.steps=7"])
    assert cfg.training.lr == 1e-4  # from the include
    assert cfg.training.steps == 7  # --set beats the file, which beats the include
    assert cfg.rollout.top_p == 0.9


def test_unknown_keys_list_valid_ones(tmp_path):
    with pytest.raises(ConfigError, match=r"unknown key\(s\) \['lrr'\] in training; valid keys: .*'lr'"):
        load_config([], ["training.lrr=1"])
    with pytest.raises(ConfigError, match="unknown key.*'trainin'.*valid keys.*'training'"):
        load_config([], ["trainin.lr=1"])
    bad = write(tmp_path, "bad.yaml", "model: {hf_pth: x}\n")
    with pytest.raises(ConfigError, match="hf_pth.*valid keys.*hf_path"):
        load_config([bad])


@pytest.mark.parametrize("override, message", [
    ("algorithm.policy_loss=ppo", r"choose one of \['ppo_clip'"),
    ("training.steps=ten", "not an integer"),
    ("training.resume=maybe", "not a boolean"),
    ("training.lr=fast", "not a number"),
    ("rollout.top_p=1.5", r"top_p=1.5 must lie in \(0, 1\]"),
    ("rollout.temperature=0", "temperature must be > 0"),
    ("rollout.group_size=1", "group_size >= 2"),
    ("training", "must look like section.key=value"),
    ("a.b.c=1", "must be section.key"),
])
def test_bad_values_name_the_key(override, message):
    with pytest.raises(ConfigError, match=message):
        load_config([], [override])


def test_first_class_flags():
    assert load_config(keep_routing=True).algorithm.routing_replay == "r3"
    assert load_config(routing_replay="r2").algorithm.routing_replay == "r2"
    with pytest.raises(ConfigError, match="contradicts"):
        load_config(keep_routing=True, routing_replay="r2")
    cfg = load_config([], ["rollout.top_k=20"], keep_sampling_mask=True)
    assert cfg.algorithm.keep_sampling_mask


def test_mask_without_truncation_fails_with_fix():
    with pytest.raises(ConfigError, match="keep-sampling-mask needs a truncating sampler.*top_p=0.9"):
        load_config(keep_sampling_mask=True)


def test_cross_field_checks():
    with pytest.raises(ConfigError, match="not divisible by training.mini_batches"):
        load_config([], ["rollout.prompts_per_step=3", "rollout.group_size=3",
                         "training.mini_batches=2"])
    with pytest.raises(ConfigError, match="kl_estimator=none"):
        load_config([], ["algorithm.kl_coef=0.1"])
    with pytest.raises(ConfigError, match="seq_mean_token_mean"):
        load_config([], ["algorithm.policy_loss=gspo", "algorithm.aggregation=token_mean"])


def test_frozen():
    cfg = load_config()
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.training.lr = 1.0


def test_every_field_is_documented():
    for section in dataclasses.fields(Config):
        cls = typing.get_type_hints(Config)[section.name]
        docs = C.field_docs(cls)
        missing = [f.name for f in dataclasses.fields(cls) if not docs.get(f.name)]
        assert not missing, f"{section.name}: undocumented fields {missing}"
    text = C.describe_options()
    assert "algorithm.routing_replay" in text and "keep routing" in text


def test_dump_and_reload_round_trip(tmp_path):
    cfg = load_config([], ["training.lr=3e-4", "rollout.top_p=0.8"], keep_routing=True)
    C.dump_yaml(cfg, tmp_path / "c.yaml")
    assert load_config([tmp_path / "c.yaml"]) == cfg


def test_every_shipped_config_loads():
    from pathlib import Path

    files = sorted(Path(__file__).resolve().parents[1].glob("configs/**/*.yaml"))
    for path in files:
        load_config([path])
