"""What the trainer checks about a real SGLang 0.5.23 server before training against it.

Both facts were measured against a running server (``tests/test_sglang_server.py``):

- SGLang 0.5.23 builds **every** Qwen2-MoE/Qwen3-MoE layer as MoE and ignores ``mlp_only_layers``
  (``models/qwen3_moe.py``: "all layers are sparse"), so a checkpoint with dense layers is served
  with uninitialised routers and experts there: garbage routes, log-probs off by ~0.04 in fp32,
  NaN in bf16. :func:`check_model_servable` refuses that pairing at start-up.
- SGLang 0.5.23's ``models/deepseek_v2.py`` reads ``moe_layer_freq``, ``topk_method`` and
  ``scoring_func`` from a DeepSeek-V3 config with no default. Released checkpoints carry them;
  transformers >= 5's ``save_pretrained`` drops them, and SGLang then fails at start-up
  (``AttributeError``), or with other values builds another router than the trainer's.
  :func:`check_config_servable` refuses such a ``config.json`` before a local start-up, as it
  refuses an OLMoE config that SGLang's ``models/olmoe.py`` (hard-coded to OLMoE-1B-7B's settings)
  would serve wrongly.
- ``sampling_seed`` is ignored unless the server runs with ``--enable-deterministic-inference``
  (``sampling/sampling_batch_info.py``), which needs a GPU attention backend.
  :func:`seeds_honoured` reads that from ``/server_info``; without it, moerl's exactly-once
  delivery of groups still holds (a group is recorded only from one complete response), but
  samples are not reproducible: a resumed run, or a group retried after a server restart, gets
  other samples than an uninterrupted run would have.
"""

from __future__ import annotations

from typing import Any, Mapping

from moerl.rollout.protocol import MoeLayout

# Model types whose SGLang 0.5.23 implementation makes every layer MoE.
ALL_MOE_MODEL_TYPES = ("qwen2_moe", "qwen3_moe")


class UnservableModelError(RuntimeError):
    """The rollout server cannot serve this checkpoint correctly; the message says what to do."""


def is_sglang(model_info: Any) -> bool:
    """True for SGLang's ``/model_info`` (moerl's built-in server adds a ``moerl`` section)."""
    return isinstance(model_info, Mapping) and "moerl" not in model_info


def check_model_servable(model_info: Mapping, layout: MoeLayout) -> None:
    """Raise :class:`UnservableModelError` if SGLang would serve this checkpoint wrongly."""
    model_type = model_info.get("model_type")
    if model_type in ALL_MOE_MODEL_TYPES and layout.dense_layers:
        raise UnservableModelError(
            f"SGLang 0.5.23 builds every {model_type} layer as MoE and ignores mlp_only_layers, "
            f"so this checkpoint's dense layers {list(layout.dense_layers)} would be served with "
            f"uninitialised routers and experts (wrong log-probs and routes). Use a checkpoint "
            f"without dense layers (released Qwen3-MoE models have none; for the tiny model: "
            f"python -m moerl.warmstart --variant tiny_moe), or rollout.server=builtin.")


# The values released DeepSeek-V3 checkpoints carry for the config fields SGLang 0.5.23 reads
# without a default; they are what moerl's trainer computes (sigmoid scores with the expert bias,
# every layer from first_k_dense_replace on MoE).
DEEPSEEK_V3_SGLANG_FIELDS = {"moe_layer_freq": 1, "topk_method": "noaux_tc",
                             "scoring_func": "sigmoid"}


def check_config_servable(config: Mapping, layout: MoeLayout) -> None:
    """:func:`check_model_servable` on a checkpoint's ``config.json``, plus what only the config
    shows (SGLang's ``/model_info`` does not carry these fields)."""
    check_model_servable(config, layout)
    model_type = config.get("model_type")
    if model_type == "deepseek_v3":
        _check_deepseek_v3_fields(config)
    elif model_type == "olmoe":
        _check_olmoe(config)


def _check_deepseek_v3_fields(config: Mapping) -> None:
    wrong = {k: config.get(k, "<missing>") for k, want in DEEPSEEK_V3_SGLANG_FIELDS.items()
             if config.get(k) != want}
    if wrong:
        raise UnservableModelError(
            f"SGLang 0.5.23 reads {sorted(DEEPSEEK_V3_SGLANG_FIELDS)} from a deepseek_v3 "
            f"config.json and serves the trainer's router only with the values released "
            f"DeepSeek-V3 checkpoints carry, {DEEPSEEK_V3_SGLANG_FIELDS}; this config has "
            f"{wrong} (transformers >= 5's save_pretrained drops these fields). Set them in the "
            f"checkpoint's config.json, or use rollout.server=builtin.")


def _check_olmoe(config: Mapping) -> None:
    """SGLang 0.5.23's ``models/olmoe.py`` hard-codes what OLMoE-1B-7B ships: ``eps=1e-5`` in
    every RMSNorm, no top-k renormalisation, and a key norm over ``hidden_size`` values (no GQA);
    other values are served wrongly (the first two, silently) or fail to load."""
    heads = config.get("num_attention_heads")
    problems = []
    if config.get("rms_norm_eps", 1e-5) != 1e-5:
        problems.append(f"rms_norm_eps={config['rms_norm_eps']} (SGLang uses 1e-5)")
    if config.get("norm_topk_prob"):
        problems.append("norm_topk_prob=true (SGLang never renormalises the top-k)")
    if config.get("num_key_value_heads", heads) != heads:
        problems.append(f"{config['num_key_value_heads']} key/value heads for {heads} heads "
                        f"(SGLang's key norm spans hidden_size values: no GQA)")
    if problems:
        raise UnservableModelError(
            f"SGLang 0.5.23 serves OLMoE only as OLMoE-1B-7B is configured; this checkpoint has "
            f"{'; '.join(problems)}. Use rollout.server=builtin for it.")


def seeds_honoured(server_info: Mapping) -> bool:
    """Whether SGLang applies ``sampling_seed`` (``--enable-deterministic-inference``)."""
    return bool(server_info.get("enable_deterministic_inference"))


SEEDS_IGNORED_WARNING = (
    "the SGLang server ignores sampling_seed (it runs without --enable-deterministic-inference, "
    "which needs a GPU attention backend): every group is still delivered exactly once, but "
    "samples are not reproducible, so a resumed run or a retried group gets other samples than "
    "an uninterrupted run would have")
