"""moerl's configuration: a tree of frozen dataclasses, loaded from YAML, overridden, validated once.

A run's config is built from one or more YAML files (later files override earlier ones; a file may
``include:`` others, paths relative to itself), then ``--set section.key=value`` overrides, then
the first-class flags ``--keep-routing``, ``--routing-replay``, ``--keep-sampling-mask``. Unknown
keys and bad values raise :class:`ConfigError` naming the key and listing the valid choices.
Every field is documented by the string literal under it; ``python -m moerl.train --options``
prints them all (the text is read from this file's source, so it cannot drift from the code).

Leaf functions never receive a config object (STYLE rule 5): the loop unpacks scalars.
"""

from __future__ import annotations

import argparse
import ast
import dataclasses
import inspect
import math
import types
import typing
import urllib.parse
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Literal

import yaml


class ConfigError(ValueError):
    """A configuration mistake, with a message that says how to fix it."""


# --------------------------------------------------------------------------- the tree


@dataclass(frozen=True)
class ModelConfig:
    hf_path: str = "runs/tiny_warmstart/hf"
    """Hugging Face checkpoint directory (config.json + safetensors) that initialises the actor."""
    ref_path: str = ""
    """Reference-policy checkpoint for the KL term; empty = the initial actor weights."""
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    """Trainer parameter dtype. bf16/fp16 keep fp32 main weights in Megatron's optimizer; fp16
    adds its dynamic loss scaling (a step whose scaled gradients overflow is skipped and the
    scale halved). Mixed precision needs CUDA (megatron-core's mixed-precision optimizer)."""
    recompute: bool = False
    """Full activation recomputation, one layer at a time (routing replay then uses the
    replay-backward list of megatron's RouterReplay)."""
    token_dispatcher: Literal["auto", "allgather", "alltoall"] = "auto"
    """MoE token dispatcher: auto = alltoall on GPU, allgather on CPU (alltoall needs CUDA)."""
    critic_path: str = ""
    """PPO only: checkpoint that initialises the value model; empty = the actor's checkpoint."""


@dataclass(frozen=True)
class ParallelConfig:
    tp: int = 1
    """Tensor-parallel size (sequence parallelism is on whenever tp > 1, as MoE requires)."""
    ep: int = 1
    """Expert-parallel size."""
    etp: int = 1
    """Expert tensor-parallel size (experts are usually not tensor-split: 1)."""
    distributed_optimizer: bool = False
    """Shard optimizer state over data-parallel ranks (ZeRO-1, megatron's distributed optimizer)."""
    batch_transport: Literal["sharded", "broadcast"] = "sharded"
    """How rank 0 hands the rollout batch to the other ranks. sharded: every rank gets the
    per-sample and [B, T] fields of the whole batch but the expert routes and sampling masks only
    of its data-parallel rank's rows (1/DP of them); broadcast: every rank gets everything. Same
    training results either way; see moerl.batch_transport."""


@dataclass(frozen=True)
class RolloutConfig:
    server: Literal["builtin", "sglang", "external"] = "builtin"
    """builtin: moerl starts its own SGLang-compatible server on this machine; sglang: moerl starts
    a real SGLang 0.5.23 server on this machine through launch/sglang_server.sh (CPU: run
    launch/setup_sglang.sh first; GPU: $MOERL_SGLANG_PYTHON names a python with moerl[sglang]),
    restarted if it dies, stopped with the trainer; external: use ``rollout.url`` (an SGLang
    server, or a moerl server started separately)."""
    url: str = ""
    """Base URL of an external rollout server, e.g. http://10.0.0.5:30000."""
    urls: str = ""
    """External rollout fleet: comma-separated base URLs of several servers (instead of
    ``url``). Groups go to the server with the least outstanding work, a group's n samples to
    one server; weight pushes go to all of them, each over a weight-update group of its own."""
    num_servers: int = 1
    """builtin: how many built-in servers to start on this machine (a fleet, as ``urls``)."""
    router_url: str = ""
    """External fleet behind a load balancer: base URL of an SMG router (SGLang's router, PyPI
    ``smg`` >= 1.13, ``pip install 'moerl[router]'``) launched with ``--worker-urls`` equal to
    ``rollout.urls``. Generation goes through it, one request per sample; weight pushes go to
    every server in ``rollout.urls`` directly. A router that drops the routes or the sampling
    mask (sglang-router does) is refused at start-up (moerl.rollout.router)."""
    api_key: str = ""
    """API key for the server's mutating endpoints (builtin: generated if empty)."""
    engine_dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    """builtin or local sglang server's dtype; bfloat16 against an fp32 trainer makes the
    engine/trainer mismatch that routing replay and the sampling mask address (as SGLang bf16 vs
    Megatron does); float16
    rollouts shrink it (10 mantissa bits against bf16's 7). An external SGLang server takes its
    dtype from its launch (DTYPE=float16 launch/sglang_server.sh)."""
    engine_max_batch_size: int = 0
    """builtin server: sequences decoded together (0: prompts_per_step * group_size, at most 256).
    1 makes each request's output a pure function of weights, prompt and seed, whatever else the
    server is doing: bitwise-reproducible runs and resumes, at the cost of throughput."""
    prompts_per_step: int = 8
    """Prompts per RL step (groups)."""
    group_size: int = 4
    """Samples per prompt (``n``): the GRPO group."""
    temperature: float = 1.0
    """Sampling temperature (must be > 0 for RL)."""
    top_p: float = 1.0
    """Nucleus sampling threshold (1.0 = off)."""
    top_k: int = -1
    """Top-k sampling (-1 = off)."""
    min_p: float = 0.0
    """Min-p sampling (0 = off)."""
    max_new_tokens: int = 16
    """Generation budget per response (DAPO's L_max)."""
    concurrency: int = 64
    """Maximum requests in flight (>= 1)."""
    timeout_s: float = 300.0
    """Per-request timeout in seconds (> 0)."""
    max_retries: int = 8
    """Retries per request on connection errors and 5xx (exponential backoff), after the first
    attempt: 0 = one attempt, no retry."""
    seed: int = 1234
    """Sampling seed; request seeds are derived from it, the step and the sample index."""
    generate: str = ""
    """Custom rollout: package.module:function, an async function (prompt, session) that drives
    the policy through a RolloutSession (multi-turn dialogue, tools, environment feedback); see
    moerl.custom_rollout. Empty: single-turn generation."""


@dataclass(frozen=True)
class AlgorithmConfig:
    name: str = "grpo"
    """Preset name, recorded in the metrics; the fields below define the algorithm."""
    advantage: Literal["grpo", "dr_grpo", "rloo", "reinforce_pp", "reinforce_pp_baseline",
                       "gae"] = "grpo"
    """Advantage estimator (moerl.algos.advantages); gae trains a critic (PPO)."""
    policy_loss: Literal["ppo_clip", "dual_clip", "gspo", "gspo_token", "cispo"] = "ppo_clip"
    """Policy loss (moerl.algos.policy_losses)."""
    clip_eps_low: float | None = 0.2
    """Lower clip 1 - eps_low (PPO 0.2; GSPO 3e-4). null: no lower bound, which only CISPO's
    weight truncation supports (MiniMax-M1 bounds the IS weight from above only)."""
    clip_eps_high: float = 0.2
    """Upper clip 1 + eps_high (DAPO clip-higher 0.28; GSPO 4e-4; CISPO's IS-weight cap)."""
    dual_clip_c: float = 3.0
    """Dual-clip bound c for policy_loss=dual_clip (Ye et al. 2020)."""
    aggregation: Literal["token_mean", "seq_mean_token_mean", "seq_mean_token_sum_norm"] = (
        "seq_mean_token_mean")
    """Loss aggregation (DAPO token_mean; GRPO seq_mean_token_mean; Dr.GRPO constant divisor)."""
    kl_estimator: Literal["none", "k1", "k2", "k3", "k3_unbiased"] = "none"
    """KL(pi_theta || pi_ref) estimator; k3_unbiased is DeepSeek-V3.2's ratio-weighted k3."""
    kl_coef: float = 0.0
    """KL coefficient beta (loss term, or reward penalty when kl_in_reward); >= 0."""
    kl_in_reward: bool = False
    """PPO style: subtract beta * KL from the token rewards instead of adding a loss term."""
    entropy_coef: float = 0.0
    """Entropy bonus coefficient (subtracted from the loss)."""
    opsm_delta: float = -1.0
    """Off-policy sequence masking threshold delta (DeepSeek-V3.2); < 0 disables it."""
    rollout_correction: Literal[
        "none", "tis", "icepop", "token_truncate", "token_mask", "token_reject", "seq_truncate",
        "seq_mask", "seq_reject", "geo_truncate", "geo_mask", "geo_reject"] = "none"
    """Train/rollout mismatch correction (moerl.algos.rollout_correction): importance weights
    pi_old / pi_rollout at token, sequence (product) or geometric-mean level, truncated to,
    masked outside, or rejecting the whole sequence outside [low, high]. tis: token truncation
    (Yao et al. 2025, C = 2); icepop: token mask on [0.5, 5] (Ling team 2025); seq_mask /
    token_mask: MIS (Liu et al. 2025, C = 2); geo_mask: verl's geometric rejection sampling."""
    rollout_correction_low: float | None = None
    """Lower bound of the rollout-correction weight (0: none); null: the entry's own default."""
    rollout_correction_high: float | None = None
    """Upper bound of the rollout-correction weight; null: the entry's own default (its source's:
    2 for TIS/MIS, 5 for icepop, 1.001 for the geometric entries)."""
    rollout_correction_self_normalize: bool = False
    """Divide the rollout-correction weights by their mean over the whole rollout batch (tokens at
    token level, sequences otherwise), so they average to 1 (self-normalised IS)."""
    bypass_old_logprobs: bool = False
    """Bypass mode: use the rollout engine's log-probs as pi_old and skip the trainer's old-log-prob
    forward (one forward pass per step saved; the PPO ratio then also absorbs the train/inference
    mismatch, so rollout_correction must be none; no r2 replay, no routing-agreement telemetry)."""
    dynamic_sampling: bool = False
    """DAPO dynamic sampling: drop groups whose rewards are all equal and refill the batch."""
    max_refill_rounds: int = 3
    """Dynamic sampling: extra rollout rounds before training on a smaller batch."""
    overlong_filter: bool = False
    """DAPO overlong filtering: responses cut at max_new_tokens do not count in the loss."""
    overlong_buffer: int = 0
    """DAPO soft overlong punishment: buffer length L_cache (0 = off)."""
    overlong_penalty: float = 1.0
    """Soft overlong punishment scale (reward -= penalty * fraction into the buffer)."""
    routing_replay: Literal["none", "r2", "r3"] = "none"
    """none: natural routing; r2: replay the trainer's own old-policy routes in training; r3 (keep
    routing): replay the rollout engine's routes in the old-logprob and training passes."""
    keep_sampling_mask: bool = False
    """Compute pi_theta over the rollout sampler's kept tokens (top-k/top-p/min-p support)."""
    gamma: float = 1.0
    """GAE / REINFORCE++ discount."""
    lam: float = 0.95
    """GAE lambda."""
    value_clip: float = 0.2
    """PPO value-function clip range."""
    critic_lr: float = 5e-6
    """Critic learning rate (PPO)."""
    ptx_coef: float = 0.0
    """PPO-ptx: coefficient of the language-model loss on pretraining data."""
    ptx_path: str = ""
    """PPO-ptx: JSONL file of {"text": ...} or {"input_ids": [...]} pretraining samples."""
    dpo_beta: float = 0.1
    """DPO beta (offline mode only)."""


@dataclass(frozen=True)
class TrainingConfig:
    mode: Literal["rl", "dpo"] = "rl"
    """rl: online RL against the rollout server; dpo: offline preference pairs (task.path)."""
    steps: int = 20
    """RL steps (one rollout each)."""
    lr: float = 1e-5
    """Actor learning rate (AdamW)."""
    warmup_steps: int = 0
    """Linear learning-rate warmup, in optimizer steps."""
    weight_decay: float = 0.0
    """AdamW decoupled weight decay."""
    adam_beta1: float = 0.9
    """AdamW beta1."""
    adam_beta2: float = 0.999
    """AdamW beta2."""
    grad_clip: float = 1.0
    """Clip gradients by their global norm across TP/EP/DP."""
    mini_batches: int = 1
    """Optimizer steps per rollout (the rollout batch is split into this many mini-batches;
    more than 1 makes later updates off-policy)."""
    epochs: int = 1
    """Passes over the rollout batch per RL step (PPO epochs)."""
    micro_batch_size: int = 8
    """Samples per forward/backward (gradient accumulation within a mini-batch)."""
    seed: int = 1
    """Trainer seed (model init RNG, data order)."""
    out_dir: str = "runs/default"
    """Run directory: metrics, TensorBoard events, checkpoints, the resolved config."""
    checkpoint_every: int = 10
    """Save a resumable checkpoint every N steps (0 = only at the end)."""
    resume: bool = True
    """Continue from the latest checkpoint in out_dir when one exists."""
    eval_every: int = 5
    """Evaluate greedy accuracy on the task's fixed evaluation set every N steps (0 = never)."""
    max_nonfinite_steps: int = 3
    """Consecutive RL steps with a non-finite gradient that are tolerated: each such step's
    optimizer update is skipped (weights and Adam state untouched), logged, and training goes on;
    one more stops the run with a checkpoint of the last good state and exit status 1."""


@dataclass(frozen=True)
class TaskConfig:
    name: Literal["arithmetic", "chain", "jsonl_math", "dataset", "preference_jsonl"] = (
        "arithmetic")
    """arithmetic: synthetic sums with an exact verifier and its own tokenizer (CPU default);
    chain: the same sums answered step by step with every partial sum written out (responses of
    tens of tokens; exact verifier on the whole chain; moerl.tasks.chain);
    jsonl_math: {"prompt", "answer"} lines with a math answer verifier and the model's HF
    tokenizer; dataset: your own prompts (JSONL, Parquet or a datasets save_to_disk directory,
    fields mapped by prompt_field/answer_field) with the model's HF tokenizer and chat template,
    scored by task.reward; preference_jsonl: {"prompt", "chosen", "rejected"} pairs for DPO."""
    path: str = ""
    """Data for jsonl_math / preference_jsonl (a JSONL file) and dataset (a .jsonl/.json-lines,
    .parquet file, or a local Hugging Face datasets directory written by save_to_disk)."""
    eval_path: str = ""
    """Evaluation data, same formats as path (default: the last eval_size records of path)."""
    split: str = "train"
    """dataset: split to train on when path is a saved DatasetDict (ignored for one split)."""
    eval_split: str = "test"
    """dataset: split to evaluate on when eval_path is a saved DatasetDict."""
    prompt_field: str = "prompt"
    """dataset: record field holding the prompt: a string (one user message) or a list of
    {"role", "content"} messages (e.g. messages)."""
    answer_field: str = "answer"
    """dataset: record field holding the reference answer (e.g. label); every other field is
    metadata, passed through to the reward."""
    system_prompt: str = ""
    """dataset: a system message put before every prompt (unless the record has its own)."""
    max_prompt_tokens: int = 0
    """dataset: prompts longer than this many tokens are dropped, with a logged count (0: the
    model's context length minus rollout.max_new_tokens)."""
    reward: str = "builtin"
    """How samples are scored; a comma-separated list is summed. builtin: the task's own verifier
    (the exact math checker for dataset/jsonl_math); math_verify: the math-verify package;
    package.module:function: your function (see moerl.rewards); http(s)://host:port/path: a
    remote reward server (POST one sample as JSON, answers a number or {"score": ...})."""
    reward_batched: bool = False
    """An imported reward function takes lists (one entry per sample) and returns a list."""
    reward_on_error: Literal["fail", "zero"] = "fail"
    """A reward that raises or times out: fail the step naming the sample, or score it 0 and
    count it in reward/errors (a warning names the sample either way)."""
    reward_timeout_s: float = 60.0
    """Seconds one reward call (one sample, or one batch when batched) may take."""
    reward_retries: int = 3
    """Remote reward server: attempts per sample on connection errors, timeouts and 5xx."""
    reward_concurrency: int = 16
    """Reward calls in flight at once (remote requests, async and threaded functions)."""
    eval_k: int = 0
    """Samples per evaluation prompt for eval/pass@k and eval/mean@k at the rollout temperature
    (0: greedy accuracy only)."""
    pass_threshold: float = 1.0
    """A sample counts as solved for pass@k when its score is at least this."""
    max_operand: int = 9
    """arithmetic, chain: operands are drawn from 0..max_operand."""
    num_terms: int = 2
    """arithmetic, chain: operands per problem."""
    eval_size: int = 64
    """Size of the fixed evaluation set."""
    seed: int = 7
    """Seed of the prompt stream and of the evaluation set."""


@dataclass(frozen=True)
class WeightSyncConfig:
    method: Literal["distributed", "disk"] = "distributed"
    """distributed: broadcast from trainer rank 0 to the server (SGLang's
    update_weights_from_distributed); disk: write safetensors and call update_weights_from_disk."""
    bucket_mb: int = 256
    """Bucket size for the distributed push."""
    master_address: str = ""
    """Address of trainer rank 0 that rollout servers join for the weight broadcast; empty:
    127.0.0.1 for the built-in server, this host's fully qualified name for external servers."""
    master_port: int = 0
    """Port of that rendezvous (0: a free port)."""


@dataclass(frozen=True)
class LoggingConfig:
    tensorboard: bool = True
    """Write TensorBoard event files to out_dir/tb."""
    progress: bool = True
    """Progress bar and per-step summary on the console (rank 0)."""
    log_level: Literal["debug", "info", "warning"] = "info"
    """Console log level."""
    wandb: bool = False
    """Also log metrics to Weights & Biases (needs the wandb package), with the run config."""
    wandb_project: str = "moerl"
    """Weights & Biases project name."""
    wandb_mode: Literal["offline", "online"] = "offline"
    """offline: write the W&B run under out_dir/wandb without network (wandb sync uploads it)."""
    sample_dumps: bool = False
    """Write every step's samples (prompt, response, reward, advantage, per-sample mismatch) to
    out_dir/samples/step_NNNNNN.jsonl."""


@dataclass(frozen=True)
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    rollout: RolloutConfig = field(default_factory=RolloutConfig)
    algorithm: AlgorithmConfig = field(default_factory=AlgorithmConfig)
    training: TrainingConfig = field(default_factory=TrainingConfig)
    task: TaskConfig = field(default_factory=TaskConfig)
    weight_sync: WeightSyncConfig = field(default_factory=WeightSyncConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)


# --------------------------------------------------------------------------- building


def _field_types(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _coerce(value: Any, tp: Any, key: str) -> Any:
    """Convert a YAML/CLI value to the field's type, or raise ConfigError naming the key."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType) and type(None) in typing.get_args(tp):
        if value is None or (isinstance(value, str) and value.lower() in ("null", "none")):
            return None
        (inner,) = [a for a in typing.get_args(tp) if a is not type(None)]
        return _coerce(value, inner, key)
    if origin is Literal:
        choices = typing.get_args(tp)
        if value not in choices:
            raise ConfigError(f"{key}={value!r} is not valid; choose one of {list(choices)}")
        return value
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false", "1", "0", "yes", "no"):
            return value.lower() in ("true", "1", "yes")
        raise ConfigError(f"{key}={value!r} is not a boolean (true/false)")
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, (int, str)):
            raise ConfigError(f"{key}={value!r} is not an integer")
        try:
            return int(value)
        except ValueError:
            raise ConfigError(f"{key}={value!r} is not an integer") from None
    if tp is float:
        if isinstance(value, bool):
            raise ConfigError(f"{key}={value!r} is not a number")
        try:
            number = float(value)
        except (TypeError, ValueError):
            raise ConfigError(f"{key}={value!r} is not a number") from None
        if not math.isfinite(number):
            raise ConfigError(f"{key}={value!r} is not a finite number")
        return number
    if tp is str:
        if isinstance(value, (dict, list)):
            raise ConfigError(f"{key} must be a string, got {type(value).__name__}")
        return "" if value is None else str(value)
    raise AssertionError(f"unhandled config type {tp} for {key}")


def _build(cls: type, data: dict[str, Any], prefix: str) -> Any:
    if not isinstance(data, dict):
        raise ConfigError(f"{prefix or 'config'} must be a mapping, got {type(data).__name__}")
    types = _field_types(cls)
    valid = [f.name for f in fields(cls)]
    unknown = sorted(set(data) - set(valid))
    if unknown:
        where = prefix or "the top level"
        raise ConfigError(f"unknown key(s) {unknown} in {where}; valid keys: {valid}")
    kwargs = {}
    for f in fields(cls):
        if f.name not in data:
            continue
        key = f"{prefix}.{f.name}" if prefix else f.name
        tp = types[f.name]
        if dataclasses.is_dataclass(tp):
            kwargs[f.name] = _build(tp, data[f.name], key)
        else:
            kwargs[f.name] = _coerce(data[f.name], tp, key)
    return cls(**kwargs)


def _deep_merge(base: dict, update: dict, prefix: str = "") -> dict:
    """``update`` over ``base``. A mapping meeting a scalar (``training: 5`` in one place,
    ``training.lr`` in another) is an error: either way round, one of them would vanish."""
    out = dict(base)
    for key, value in update.items():
        name = f"{prefix}.{key}" if prefix else str(key)
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _deep_merge(out[key], value, name)
        elif key in out and isinstance(value, dict) != isinstance(out[key], dict):
            raise ConfigError(f"{name} is a mapping in one source and {out[key]!r} / {value!r} "
                              f"in another: write it as a mapping of keys (e.g. {name}: "
                              f"{{key: value}}) everywhere")
        else:
            out[key] = value
    return out


class _UniqueKeyLoader(yaml.SafeLoader):
    """YAML's safe loader, except that a key given twice in one mapping is an error (PyYAML
    keeps the last one silently)."""

    def construct_mapping(self, node, deep=False):
        seen = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            if key in seen:
                raise ConfigError(f"duplicate key {key!r} at line {key_node.start_mark.line + 1}"
                                  f" of {key_node.start_mark.name}: give each key once")
            seen.add(key)
        return super().construct_mapping(node, deep=deep)


def _read_yaml(path: Path, seen: tuple[Path, ...] = ()) -> dict:
    path = path.resolve()
    if path in seen:
        raise ConfigError(f"include cycle: {' -> '.join(str(p) for p in (*seen, path))}")
    if not path.is_file():
        raise ConfigError(f"config file {path} does not exist")
    try:
        with path.open() as fh:
            data = yaml.load(fh, Loader=_UniqueKeyLoader) or {}
    except yaml.YAMLError as err:
        raise ConfigError(f"{path} is not valid YAML: {err}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path} must hold a mapping at the top level")
    merged: dict = {}
    includes = data.pop("include", []) or []
    for inc in [includes] if isinstance(includes, str) else includes:
        merged = _deep_merge(merged, _read_yaml(path.parent / inc, (*seen, path)))
    return _deep_merge(merged, data)


def parse_override(text: str) -> dict:
    """``a.b=c`` -> ``{"a": {"b": <c parsed as YAML scalar>}}``."""
    if "=" not in text:
        raise ConfigError(f"--set {text!r} must look like section.key=value")
    dotted, raw = text.split("=", 1)
    parts = dotted.strip().split(".")
    if len(parts) != 2 or not all(parts):
        raise ConfigError(f"--set {text!r}: the key must be section.key, e.g. training.lr=1e-5")
    value = yaml.safe_load(raw) if raw.strip() else ""
    return {parts[0]: {parts[1]: value}}


def load_config(paths: list[str | Path] = (), overrides: list[str] = (), *,
                keep_routing: bool = False, routing_replay: str | None = None,
                keep_sampling_mask: bool | None = None) -> Config:
    """Build and validate a Config from YAML files, ``--set`` overrides and the first-class flags."""
    data: dict = {}
    for path in paths:
        data = _deep_merge(data, _read_yaml(Path(path)))
    for text in overrides:
        data = _deep_merge(data, parse_override(text))
    algo = data.setdefault("algorithm", {})
    if keep_routing and routing_replay not in (None, "r3"):
        raise ConfigError(f"--keep-routing means --routing-replay r3; it contradicts "
                          f"--routing-replay {routing_replay}")
    if keep_routing:
        algo["routing_replay"] = "r3"
    elif routing_replay is not None:
        algo["routing_replay"] = routing_replay
    if keep_sampling_mask is not None:
        algo["keep_sampling_mask"] = keep_sampling_mask
    config = _build(Config, data, "")
    validate(config)
    return config


def validate(config: Config) -> None:
    """Cross-field checks that must fail before any work starts, each saying how to fix it."""
    r, a, t = config.rollout, config.algorithm, config.training
    problems = []
    if r.temperature <= 0:
        problems.append("rollout.temperature must be > 0 for RL (greedy samples have no "
                        "log-prob to train on)")
    if not 0 < r.top_p <= 1:
        problems.append(f"rollout.top_p={r.top_p} must lie in (0, 1]")
    if r.top_k == 0 or r.top_k < -1:
        problems.append(f"rollout.top_k={r.top_k}: use -1 (off) or a positive integer")
    if not 0 <= r.min_p < 1:
        problems.append(f"rollout.min_p={r.min_p} must lie in [0, 1)")
    if a.keep_sampling_mask and r.top_p >= 1 and r.top_k == -1 and r.min_p == 0:
        problems.append("--keep-sampling-mask needs a truncating sampler, but rollout.top_p=1, "
                        "top_k=-1 and min_p=0 keep the whole vocabulary: set e.g. "
                        "--set rollout.top_p=0.9 or --set rollout.top_k=50, or drop the flag")
    if r.server == "external" and not (r.url or r.urls):
        problems.append("rollout.server=external needs rollout.url (e.g. http://host:30000) or "
                        "rollout.urls (comma-separated, for a fleet)")
    if r.url and r.urls:
        problems.append("set rollout.url or rollout.urls, not both (urls lists every server)")
    if r.server == "builtin" and r.urls:
        problems.append("rollout.urls names external servers: set rollout.server=external, or "
                        "use rollout.num_servers for built-in ones")
    if r.router_url and not (r.server == "external" and r.urls):
        problems.append("rollout.router_url needs rollout.server=external and rollout.urls (the "
                        "router's workers, which moerl pushes the weights to directly)")
    if r.num_servers < 1:
        problems.append(f"rollout.num_servers={r.num_servers} must be >= 1")
    if r.num_servers > 1 and r.server == "external":
        problems.append("rollout.num_servers counts built-in servers; for external ones list "
                        "them in rollout.urls")
    if r.engine_max_batch_size < 0:
        problems.append("rollout.engine_max_batch_size must be >= 0 (0: automatic)")
    if r.group_size < 1 or r.prompts_per_step < 1 or r.max_new_tokens < 1:
        problems.append("rollout.group_size, prompts_per_step and max_new_tokens must be >= 1")
    if a.advantage in ("grpo", "dr_grpo", "rloo") and r.group_size < 2:
        problems.append(f"algorithm.advantage={a.advantage} compares samples within a group: "
                        f"set rollout.group_size >= 2")
    if a.advantage == "gae" and a.policy_loss in ("gspo", "gspo_token"):
        problems.append("GSPO uses sequence-level advantages; use an outcome estimator "
                        "(grpo/dr_grpo/rloo), not gae")
    if a.clip_eps_low is None and a.policy_loss != "cispo":
        problems.append(f"algorithm.clip_eps_low=null (no lower bound) is CISPO's weight "
                        f"truncation; policy_loss={a.policy_loss} clips the ratio on both sides: "
                        f"set clip_eps_low (e.g. 0.2)")
    problems += _bypass_problems(config)
    if a.kl_estimator == "none" and a.kl_coef:
        problems.append("algorithm.kl_coef is set but kl_estimator=none: choose k1/k2/k3/"
                        "k3_unbiased or set kl_coef=0")
    if a.kl_in_reward and a.kl_estimator == "k3_unbiased":
        problems.append("k3_unbiased is a loss-term estimator (its gradient flows through the "
                        "ratio); with kl_in_reward use k1")
    if a.policy_loss in ("gspo", "gspo_token") and a.aggregation != "seq_mean_token_mean":
        problems.append("GSPO's objective is a mean over sequences of the sequence ratio term: "
                        "use algorithm.aggregation=seq_mean_token_mean")
    if a.aggregation == "seq_mean_token_sum_norm" and r.max_new_tokens < 1:
        problems.append("seq_mean_token_sum_norm divides by rollout.max_new_tokens")
    if a.overlong_buffer >= r.max_new_tokens:
        problems.append(f"algorithm.overlong_buffer={a.overlong_buffer} must be smaller than "
                        f"rollout.max_new_tokens={r.max_new_tokens}")
    if a.ptx_coef and not a.ptx_path:
        problems.append("algorithm.ptx_coef > 0 needs algorithm.ptx_path (pretraining JSONL)")
    if t.mini_batches < 1 or t.epochs < 1 or t.micro_batch_size < 1 or t.steps < 0:
        problems.append("training.mini_batches, epochs, micro_batch_size must be >= 1, steps >= 0")
    batch = r.prompts_per_step * r.group_size
    if t.mode == "rl" and batch % t.mini_batches:
        problems.append(f"rollout batch {batch} (prompts_per_step*group_size) is not divisible "
                        f"by training.mini_batches={t.mini_batches}")
    if t.mode == "dpo" and config.task.name != "preference_jsonl":
        problems.append("training.mode=dpo trains on preference pairs: set "
                        "task.name=preference_jsonl and task.path")
    problems += _task_problems(config.task)
    if config.task.name in ("jsonl_math", "dataset", "preference_jsonl") and not config.task.path:
        problems.append(f"task.name={config.task.name} needs task.path")
    for name in ("tp", "ep", "etp"):
        if getattr(config.parallel, name) < 1:
            problems.append(f"parallel.{name} must be >= 1")
    problems += _range_problems(config)
    if problems:
        raise ConfigError("invalid configuration:\n  - " + "\n  - ".join(problems))


def _bypass_problems(config: Config) -> list[str]:
    """Combinations that bypass mode (engine log-probs as pi_old) cannot honour."""
    r, a = config.rollout, config.algorithm
    if not a.bypass_old_logprobs:
        return []
    problems = []
    if a.routing_replay == "r2":
        problems.append("algorithm.bypass_old_logprobs skips the old-log-prob pass that records "
                        "the routes r2 replays: use routing_replay none or r3, or turn bypass off")
    if a.rollout_correction != "none":
        problems.append(f"algorithm.bypass_old_logprobs makes pi_old the rollout policy, so "
                        f"rollout_correction={a.rollout_correction} would weigh every token by 1: "
                        f"set rollout_correction=none or turn bypass off")
    truncating = r.top_p < 1 or r.top_k > 0 or r.min_p > 0
    if truncating and not a.keep_sampling_mask:
        problems.append("algorithm.bypass_old_logprobs with a truncating sampler (top_p/top_k/"
                        "min_p) uses the truncated distribution's log-probs as pi_old: turn on "
                        "--keep-sampling-mask so pi_theta is computed over the same support")
    return problems


# Bounds of single values: (section.key, lowest, highest, lowest allowed, highest allowed). A value
# outside them would not fail; it would quietly mean something else (a negative KL coefficient
# turns the penalty into a reward, zero retries meant zero attempts, a port past 65535 wraps).
_RANGES = [
    ("rollout.concurrency", 1, None, True, True),
    ("rollout.timeout_s", 0, None, False, True),
    ("rollout.max_retries", 0, None, True, True),
    ("algorithm.clip_eps_low", 0, 1, True, True),
    ("algorithm.clip_eps_high", 0, None, True, True),
    ("algorithm.dual_clip_c", 1, None, False, True),
    ("algorithm.kl_coef", 0, None, True, True),
    ("algorithm.rollout_correction_low", 0, None, True, True),
    ("algorithm.rollout_correction_high", 0, None, False, True),
    ("algorithm.max_refill_rounds", 0, None, True, True),
    ("algorithm.overlong_buffer", 0, None, True, True),
    ("algorithm.overlong_penalty", 0, None, True, True),
    ("algorithm.gamma", 0, 1, True, True),
    ("algorithm.lam", 0, 1, True, True),
    ("algorithm.value_clip", 0, None, False, True),
    ("algorithm.critic_lr", 0, None, False, True),
    ("algorithm.ptx_coef", 0, None, True, True),
    ("algorithm.dpo_beta", 0, None, False, True),
    ("training.lr", 0, None, False, True),
    ("training.warmup_steps", 0, None, True, True),
    ("training.weight_decay", 0, None, True, True),
    ("training.adam_beta1", 0, 1, True, False),
    ("training.adam_beta2", 0, 1, True, False),
    ("training.grad_clip", 0, None, True, True),
    ("training.checkpoint_every", 0, None, True, True),
    ("training.eval_every", 0, None, True, True),
    ("training.max_nonfinite_steps", 0, None, True, True),
    ("task.max_operand", 1, None, True, True),
    ("task.num_terms", 1, None, True, True),
    ("task.eval_size", 1, None, True, True),
    ("weight_sync.bucket_mb", 1, None, True, True),
    ("weight_sync.master_port", 0, 65535, True, True),
]


def _range_problems(config: Config) -> list[str]:
    problems = []
    for key, low, high, low_ok, high_ok in _RANGES:
        section, name = key.split(".")
        value = getattr(getattr(config, section), name)
        if value is None:  # an optional bound left open (e.g. CISPO's clip_eps_low)
            continue
        if low is not None and (value < low or (value == low and not low_ok)):
            problems.append(f"{key}={value} must be {'>=' if low_ok else '>'} {low}")
        if high is not None and (value > high or (value == high and not high_ok)):
            problems.append(f"{key}={value} must be {'<=' if high_ok else '<'} {high}")
    if config.rollout.url:
        problems += _url_problems("rollout.url", config.rollout.url)
    if config.rollout.router_url:
        problems += _url_problems("rollout.router_url", config.rollout.router_url)
    return problems


def _url_problems(key: str, url: str) -> list[str]:
    try:
        parts = urllib.parse.urlsplit(url)
        parts.port  # raises ValueError for a port out of 0..65535 or not a number
    except ValueError as err:
        return [f"{key}={url!r} is not a valid URL: {err}"]
    if parts.scheme not in ("http", "https") or not parts.hostname:
        return [f"{key}={url!r} must look like http://host:port"]
    return []


def _task_problems(t: TaskConfig) -> list[str]:
    problems = []
    if t.reward_timeout_s <= 0 or t.reward_retries < 1 or t.reward_concurrency < 1:
        problems.append("task.reward_timeout_s must be > 0, reward_retries and "
                        "reward_concurrency >= 1")
    if t.eval_k < 0 or t.max_prompt_tokens < 0:
        problems.append("task.eval_k and task.max_prompt_tokens must be >= 0")
    return problems


# --------------------------------------------------------------------------- docs and I/O


def field_docs(cls: type) -> dict[str, str]:
    """The string literal under each field of a config dataclass (its documentation)."""
    tree = ast.parse(inspect.getsource(cls))
    body = tree.body[0].body
    docs = {}
    for node, nxt in zip(body, body[1:]):
        if (isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name)
                and isinstance(nxt, ast.Expr) and isinstance(nxt.value, ast.Constant)
                and isinstance(nxt.value.value, str)):
            docs[node.target.id] = " ".join(nxt.value.value.split())
    return docs


def describe_options() -> str:
    """Every ``section.key``, its default and its documentation, for ``--options``."""
    lines = []
    for section in fields(Config):
        cls = _field_types(Config)[section.name]
        docs = field_docs(cls)
        lines.append(f"[{section.name}]")
        for f in fields(cls):
            default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
            lines.append(f"  {section.name}.{f.name} = {default!r}")
            lines.append(f"      {docs.get(f.name, '')}")
    return "\n".join(lines)


def to_dict(config: Config) -> dict:
    return dataclasses.asdict(config)


def dump_yaml(config: Config, path: str | Path) -> None:
    """Write the resolved config; an identical file is left untouched (a rerun changes nothing)."""
    path, text = Path(path), yaml.safe_dump(to_dict(config), sort_keys=False)
    if not path.is_file() or path.read_text() != text:
        path.write_text(text)


def add_cli_arguments(parser: argparse.ArgumentParser) -> None:
    """The arguments every moerl entry point shares: configs, ``--set`` and the replay flags."""
    parser.add_argument("configs", nargs="*", help="YAML config files, merged left to right")
    parser.add_argument("--set", dest="overrides", action="append", default=[],
                        metavar="SECTION.KEY=VALUE", help="override one config value (repeatable)")
    parser.add_argument("--keep-routing", action="store_true",
                        help="replay the rollout engine's expert routes in training "
                             "(= --routing-replay r3)")
    parser.add_argument("--routing-replay", choices=["none", "r2", "r3"], default=None,
                        help="routing replay mode: none (natural), r2 (replay the trainer's own "
                             "old-policy routes), r3 (replay the rollout's routes)")
    parser.add_argument("--keep-sampling-mask", action=argparse.BooleanOptionalAction,
                        default=None, help="compute the policy's log-probs over the rollout "
                                           "sampler's kept tokens (top-k/top-p/min-p support)")
    parser.add_argument("--options", action="store_true",
                        help="print every config key with its default and documentation, then exit")


def config_from_args(args: argparse.Namespace) -> Config:
    return load_config(args.configs, args.overrides, keep_routing=args.keep_routing,
                       routing_replay=args.routing_replay,
                       keep_sampling_mask=args.keep_sampling_mask)

