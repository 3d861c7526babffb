"""The Megatron-free architecture record every model family fills in, and the pieces families share.

A model family is one module of :mod:`moerl.families` that provides a :class:`Family`:

- ``read``: an HF config (dict) -> :class:`MoEArchitecture`, including its :class:`RouterRule`;
- ``megatron_settings``: the family's own Megatron ``TransformerConfig`` keywords (QK-norm, shared
  experts, ...); the router keywords follow from the :class:`RouterRule` (:func:`router_settings`);
- ``units``: its HF <-> Megatron tensor map, a list of :class:`Unit` in export order.

Nothing here imports Megatron or transformers: the planner, the rollout side and the bridge read the
same record. Adding a family (gpt-oss, Qwen3-Next) is one new module plus one registry line.

Vocabulary padding follows Megatron-LM (``_vocab_size_with_padding``): the embedding and output
layer have ``ceil(V / (128 * tp)) * 128 * tp`` rows, so each TP rank holds the same number of rows
and that number is a multiple of 128. The padded rows are zero after loading, never exported, and
their logits are excluded from every softmax (see ``moerl.trainer.logprobs``).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

# Megatron-LM's ``--make-vocab-size-divisible-by`` default: rows per TP rank are a multiple of it.
VOCAB_PAD_MULTIPLE = 128


@dataclass(frozen=True)
class RouterRule:
    """How a family's router turns a token's router logits into experts and gate weights.

    ``softmax``: gate = softmax over all experts at the top-k, renormalised over the k when
    ``norm_topk_prob``. ``sigmoid`` (DeepSeek-V3, GLM-4.5): selection by ``sigmoid(logit) + bias``
    within the ``group_topk`` best of ``num_groups`` groups; gate = the unbiased sigmoid at the
    selected experts, renormalised when ``norm_topk_prob``, times ``scaling_factor``. The bias
    (``e_score_correction_bias``) is frozen in RL (Megatron's bias update rate is 0).
    """

    score: str  # "softmax" | "sigmoid"
    norm_topk_prob: bool
    expert_bias: bool = False  # a per-expert selection bias (sigmoid routers only)
    num_groups: int = 0  # 0: no group-limited selection
    group_topk: int = 0
    scaling_factor: float = 1.0

    def __post_init__(self) -> None:
        assert self.score in ("softmax", "sigmoid"), self.score
        assert bool(self.num_groups) == bool(self.group_topk), (self.num_groups, self.group_topk)


@dataclass(frozen=True)
class MLAShape:
    """Multi-head latent attention (DeepSeek-V2/V3): low-rank query and key/value projections."""

    q_lora_rank: int | None  # None: a plain query projection (DeepSeek-V2-Lite, Moonlight-style)
    kv_lora_rank: int
    qk_nope_head_dim: int
    qk_rope_head_dim: int
    v_head_dim: int


@dataclass(frozen=True)
class Yarn:
    """YaRN RoPE scaling as DeepSeek-V3 checkpoints ship it (``rope_scaling`` / ``rope_parameters``)."""

    factor: float
    original_max_position_embeddings: int
    beta_fast: float = 32.0
    beta_slow: float = 1.0
    mscale: float = 1.0
    mscale_all_dim: float = 0.0


@dataclass(frozen=True)
class MoEArchitecture:
    """The facts about a model that the trainer, bridge, replay and planner all need."""

    family: str
    vocab_size: int
    hidden_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    dense_ffn: int  # MLP width of dense layers
    expert_ffn: int
    num_experts: int
    top_k: int
    moe_layers: tuple[bool, ...]  # per hidden layer: True if MoE, False if dense
    rope_theta: float
    rms_norm_eps: float
    tie_word_embeddings: bool
    max_position_embeddings: int
    router: RouterRule
    qk_norm: bool = False  # RMSNorm of queries and keys (per head unless qk_norm_full_projection)
    qk_norm_full_projection: bool = False  # one RMSNorm over all heads' q (and k) values (OLMoE)
    shared_expert_ffn: int = 0  # width of the always-on shared expert MLP; 0: none
    shared_expert_gate: bool = False  # shared expert output scaled by sigmoid(h . w) (Qwen2-MoE)
    rotary_percent: float = 1.0  # fraction of each head's dims that RoPE rotates
    qkv_bias: bool = False  # q/k/v projections carry a bias
    num_mtp_layers: int = 0  # multi-token-prediction layers on disk (not part of the policy)
    mla: MLAShape | None = None  # multi-head latent attention instead of GQA
    yarn: Yarn | None = None  # YaRN RoPE scaling (None: plain RoPE)

    @property
    def norm_topk_prob(self) -> bool:
        return self.router.norm_topk_prob

    @property
    def moe_layer_ids(self) -> list[int]:
        return [i for i, is_moe in enumerate(self.moe_layers) if is_moe]

    def padded_vocab_size(self, tp: int) -> int:
        """Rows of the Megatron embedding and output layer at tensor parallelism ``tp``."""
        multiple = VOCAB_PAD_MULTIPLE * tp
        return -(-self.vocab_size // multiple) * multiple


@dataclass(frozen=True)
class Unit:
    """One logical Megatron tensor and the HF tensors (name, full shape) it is made of.

    ``split`` says how Megatron shards it (see ``moerl.trainer.hf_bridge``): ``none``, ``rows``,
    ``cols``, ``qkv``, ``glu``, ``vocab`` (rows, padded to :meth:`padded_vocab_size`) or ``down``
    (MLA's down projections: replicated as moerl builds them, rows if a spec column-splits them).
    ``buffer``: a Megatron buffer, not a parameter (the router's expert bias).
    """

    key: str  # canonical Megatron name; experts by global id: "...experts.{e}.linear_fc1.weight"
    hf: tuple[tuple[str, tuple[int, ...]], ...]
    split: str
    expert: int | None = None  # global expert id
    buffer: bool = False

    @property
    def hf_names(self) -> tuple[str, ...]:
        return tuple(name for name, _ in self.hf)


@dataclass(frozen=True)
class Family:
    """A model family: its HF model types, config reader, Megatron settings and tensor map."""

    name: str
    model_types: tuple[str, ...]
    read: Callable[[dict[str, Any]], MoEArchitecture]
    megatron_settings: Callable[[MoEArchitecture], dict[str, Any]]
    units: Callable[[MoEArchitecture], list[Unit]]
    moe_module: str = "mlp"  # HF attribute of a decoder layer holding router and experts


def router_settings(rule: RouterRule) -> dict[str, Any]:
    """Megatron ``TransformerConfig`` keywords for ``rule`` (router in fp32, no aux loss).

    Softmax: top-k on logits then softmax over the k equals softmax, top-k, renormalise
    (``norm_topk_prob``); without renormalisation Megatron takes the full softmax first
    (``moe_router_pre_softmax``). Sigmoid: Megatron always renormalises the k sigmoid scores
    (the families that use it ship ``norm_topk_prob=True``; readers refuse the other case).
    """
    settings: dict[str, Any] = dict(
        moe_router_score_function=rule.score, moe_router_load_balancing_type="none",
        moe_aux_loss_coeff=0.0, moe_router_dtype="fp32",
        moe_router_pre_softmax=rule.score == "softmax" and not rule.norm_topk_prob)
    if rule.scaling_factor != 1.0:
        settings["moe_router_topk_scaling_factor"] = rule.scaling_factor
    if rule.num_groups:
        settings.update(moe_router_num_groups=rule.num_groups, moe_router_group_topk=rule.group_topk)
    if rule.expert_bias:
        # Frozen in RL: the policy-gradient step must not move the selection bias.
        settings.update(moe_router_enable_expert_bias=True, moe_router_bias_update_rate=0.0)
    return settings


# ------------------------------------------------------------------ reading HF configs


def rope_theta_of(cfg: dict[str, Any]) -> float:
    """RoPE base from ``rope_parameters`` (transformers >= 5) or the older ``rope_theta``."""
    rope = cfg.get("rope_parameters") or {}
    return float(rope.get("rope_theta", cfg.get("rope_theta", 10000.0)))


def require_default_rope(cfg: dict[str, Any], family: str) -> None:
    rope = cfg.get("rope_parameters") or cfg.get("rope_scaling") or {}
    kind = rope.get("rope_type", rope.get("type", "default"))
    if kind != "default":
        raise ValueError(f"{family}: rope_type {kind!r} is not supported (only 'default')")


def moe_layer_flags(cfg: dict[str, Any]) -> tuple[bool, ...]:
    """Per hidden layer, whether it is MoE: the same rule the rollout protocol validates with."""
    from moerl.rollout.protocol import MoeLayout

    moe_ids = set(MoeLayout.from_hf_config(cfg).moe_layers)
    return tuple(i in moe_ids for i in range(cfg["num_hidden_layers"]))


def common_fields(cfg: dict[str, Any], *, family: str) -> dict[str, Any]:
    """The :class:`MoEArchitecture` fields every family reads the same way."""
    heads = cfg["num_attention_heads"]
    return dict(
        family=family, vocab_size=cfg["vocab_size"], hidden_size=cfg["hidden_size"],
        num_layers=cfg["num_hidden_layers"], num_heads=heads,
        num_kv_heads=cfg.get("num_key_value_heads") or heads,
        head_dim=cfg.get("head_dim") or cfg["hidden_size"] // heads,
        dense_ffn=cfg["intermediate_size"], top_k=cfg["num_experts_per_tok"],
        moe_layers=moe_layer_flags(cfg), rope_theta=rope_theta_of(cfg),
        rms_norm_eps=cfg["rms_norm_eps"], tie_word_embeddings=bool(cfg.get("tie_word_embeddings")),
        max_position_embeddings=cfg.get("max_position_embeddings", 4096))


# ------------------------------------------------------------------ tensor-map pieces


def glu_units(meg: str, hf: str, names: tuple[str, str, str], ffn: int, h: int,
              expert: int | None = None) -> list[Unit]:
    """A SwiGLU MLP: Megatron ``linear_fc1`` = [gate; up] per shard, ``linear_fc2`` = down."""
    gate, up, down = names
    return [Unit(f"{meg}.linear_fc1.weight",
                 ((f"{hf}.{gate}.weight", (ffn, h)), (f"{hf}.{up}.weight", (ffn, h))), "glu",
                 expert),
            Unit(f"{meg}.linear_fc2.weight", ((f"{hf}.{down}.weight", (h, ffn)),), "cols", expert)]


def gqa_attention_units(arch: MoEArchitecture, meg: str, attn: str, *,
                        proj: tuple[str, str, str, str] = ("q_proj", "k_proj", "v_proj", "o_proj"),
                        qk_norm_names: tuple[str, str] = ("q_norm", "k_norm"),
                        qkv_bias: bool = False) -> list[Unit]:
    """Fused QKV (and its bias), optional QK-norm, output projection of a GQA block."""
    h, d = arch.hidden_size, arch.head_dim
    q_dim, kv_dim = arch.num_heads * d, arch.num_kv_heads * d
    q, k, v, o = proj
    units = [Unit(f"{meg}.self_attention.linear_qkv.weight",
                  ((f"{attn}.{q}.weight", (q_dim, h)), (f"{attn}.{k}.weight", (kv_dim, h)),
                   (f"{attn}.{v}.weight", (kv_dim, h))), "qkv")]
    if qkv_bias:
        units.append(Unit(f"{meg}.self_attention.linear_qkv.bias",
                          ((f"{attn}.{q}.bias", (q_dim,)), (f"{attn}.{k}.bias", (kv_dim,)),
                           (f"{attn}.{v}.bias", (kv_dim,))), "qkv"))
    if arch.qk_norm:
        # Per head: one [d] weight shared by the heads; full projection: one weight per value,
        # held whole on every TP rank (moerl.trainer.qk_norm).
        sizes = (q_dim, kv_dim) if arch.qk_norm_full_projection else (d, d)
        units += [Unit(f"{meg}.self_attention.{which}_layernorm.weight",
                       ((f"{attn}.{norm}.weight", (size,)),), "none")
                  for which, norm, size in zip("qk", qk_norm_names, sizes)]
    units.append(Unit(f"{meg}.self_attention.linear_proj.weight",
                      ((f"{attn}.{o}.weight", (h, q_dim)),), "cols"))
    return units


def norm_unit(meg: str, hf: str, size: int) -> Unit:
    return Unit(meg, ((hf, (size,)),), "none")


def router_units(arch: MoEArchitecture, meg: str, gate: str) -> list[Unit]:
    """Router weight (replicated), and the expert bias buffer when the rule has one."""
    units = [Unit(f"{meg}.router.weight", ((f"{gate}.weight", (arch.num_experts, arch.hidden_size)),),
                  "none")]
    if arch.router.expert_bias:
        units.append(Unit(f"{meg}.router.expert_bias",
                          ((f"{gate}.e_score_correction_bias", (arch.num_experts,)),), "none",
                          buffer=True))
    return units


def shared_expert_units(arch: MoEArchitecture, meg: str, hf: str) -> list[Unit]:
    """The always-on shared expert (tensor-parallel like a dense MLP, never routed or replayed)."""
    return glu_units(f"{meg}.shared_experts", hf, ("gate_proj", "up_proj", "down_proj"),
                     arch.shared_expert_ffn, arch.hidden_size)


def sigmoid_router_rule(cfg: dict[str, Any], family: str) -> RouterRule:
    """DeepSeek-V3-style router (DeepSeek-V3, Kimi-K2, Moonlight, GLM-4.5): sigmoid scores,
    ``e_score_correction_bias``, ``n_group``/``topk_group`` selection, ``routed_scaling_factor``.

    Megatron always renormalises the k sigmoid scores and ranks groups by the sum of their top
    ``k / topk_group`` scores where transformers uses the top 2: configs where the two differ
    are refused instead of trained with another router than the checkpoint's.
    """
    top_k, groups, group_topk = (cfg["num_experts_per_tok"], cfg.get("n_group") or 1,
                                 cfg.get("topk_group") or 1)
    if not cfg.get("norm_topk_prob", True) and top_k > 1:
        raise ValueError(f"{family}: norm_topk_prob=false with a sigmoid router is not supported "
                         "(Megatron always renormalises the top-k sigmoid scores)")
    if groups > 1 and top_k // group_topk != 2:
        raise ValueError(f"{family}: group-limited routing needs num_experts_per_tok / topk_group "
                         f"== 2 (transformers ranks groups by their top-2 scores, Megatron by their "
                         f"top k/topk_group); got {top_k} / {group_topk}")
    return RouterRule(score="sigmoid", norm_topk_prob=True, expert_bias=True,
                      num_groups=groups if groups > 1 else 0,
                      group_topk=group_topk if groups > 1 else 0,
                      scaling_factor=float(cfg.get("routed_scaling_factor") or 1.0))


def embedding_unit(arch: MoEArchitecture) -> Unit:
    return Unit("embedding.word_embeddings.weight",
                (("model.embed_tokens.weight", (arch.vocab_size, arch.hidden_size)),), "vocab")


def final_units(arch: MoEArchitecture) -> list[Unit]:
    """Final norm and (untied) output layer."""
    units = [norm_unit("decoder.final_layernorm.weight", "model.norm.weight", arch.hidden_size)]
    if not arch.tie_word_embeddings:
        units.append(Unit("output_layer.weight",
                          (("lm_head.weight", (arch.vocab_size, arch.hidden_size)),), "vocab"))
    return units


def decoder_units(arch: MoEArchitecture, *, attention: Callable[[str, str], list[Unit]],
                  moe_block: Callable[[str, str], list[Unit]], moe_module: str = "mlp",
                  dense_proj: tuple[str, str, str] = ("gate_proj", "up_proj", "down_proj")
                  ) -> list[Unit]:
    """The whole model in export order: embedding, each layer (norms, attention, MLP or MoE),
    final norm, head. ``attention(meg, hf_attn)`` and ``moe_block(meg_mlp, hf_mlp)`` are the
    family's pieces."""
    h = arch.hidden_size
    units = [embedding_unit(arch)]
    for i, is_moe in enumerate(arch.moe_layers):
        meg, hf = f"decoder.layers.{i}", f"model.layers.{i}"
        units.append(norm_unit(f"{meg}.input_layernorm.weight", f"{hf}.input_layernorm.weight", h))
        units += attention(meg, f"{hf}.self_attn")
        units.append(norm_unit(f"{meg}.pre_mlp_layernorm.weight",
                               f"{hf}.post_attention_layernorm.weight", h))
        if is_moe:
            units += moe_block(f"{meg}.mlp", f"{hf}.{moe_module}")
        else:
            units += glu_units(f"{meg}.mlp", f"{hf}.mlp", dense_proj, arch.dense_ffn, h)
    return units + final_units(arch)


def routed_expert_units(arch: MoEArchitecture, meg: str, hf: str,
                        names: tuple[str, str, str] = ("gate_proj", "up_proj", "down_proj")
                        ) -> list[Unit]:
    return [u for e in range(arch.num_experts)
            for u in glu_units(f"{meg}.experts.{e}", f"{hf}.experts.{e}", names, arch.expert_ffn,
                               arch.hidden_size, e)]
