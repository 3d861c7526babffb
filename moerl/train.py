"""moerl's main job: RL post-training of a Megatron MoE policy against a rollout server.

    torchrun --nproc_per_node 2 -m moerl.train configs/grpo.yaml [--set a.b=c] [--keep-routing]

One RL step reads as the pipeline (DESIGN.md):

    prompts -> rollout -> rewards -> dynamic sampling -> reference log-probs -> old log-probs
    -> advantages -> mini-batch updates -> weight sync -> metrics -> checkpoint

Rank 0 drives the rollout server and scores samples; the packed batch goes to every rank, its
routes and sampling masks only to the data-parallel rank that owns their rows
(``moerl.batch_transport``). Each data-parallel rank computes the log-probs of its own rows
(``moerl.data_parallel``), which are then all-gathered so advantages see the whole batch, and
trains on its own rows: every mini-batch is split across data-parallel ranks; loss denominators
are global, gradients are summed.

Deviations from the papers' algorithms, all deliberate:
- pi_old in the PPO ratio is the trainer's recompute (``old_logprobs``), not the engine's
  log-probs (unless ``algorithm.bypass_old_logprobs``); OPSM and the rollout corrections use the
  engine's, as their papers say.
- Dynamic sampling refills by generating more groups, at most ``max_refill_rounds`` times, then
  trains on what it has (DAPO keeps sampling without bound).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from moerl.algos import AGGREGATIONS, CRITIC_ESTIMATORS, dynamic_sampling_keep, local_denominators
from moerl.algos import mismatch_metrics, ptx_loss
from moerl.batch import RolloutBatch, Sample, broadcast_json, pack_samples
from moerl.batch_transport import send_batch
from moerl.checkpoint import CheckpointManager
from moerl.config import Config, ConfigError, add_cli_arguments, config_from_args
from moerl.config import describe_options, dump_yaml, to_dict
from moerl.data_parallel import DataParallel
from moerl.evaluation import dump_samples, eval_metrics
from moerl.mechanism import grad_split_metrics, mismatch_split_counts, mismatch_split_metrics
from moerl.mechanism import route_diff_layers, update_sums
from moerl.objective import Objective, compute_advantages, compute_rollout_weights, loss_mask
from moerl.objective import policy_loss
from moerl.rewards import RewardError, merge_metrics, score_samples
from moerl.run_guard import OutDirLock, exit_with_launcher
from moerl.tasks import Task, build_task
from moerl.telemetry import StageTimer, Telemetry
from moerl.trainer.megatron_version import UnsupportedMegatronError, check_megatron_version

if TYPE_CHECKING:  # the trainer imports megatron, which takes seconds: only where it is used
    from moerl.custom_rollout import CustomRollout
    from moerl.rewards import Scorer
    from moerl.rollout_manager import RolloutManager
    from moerl.tasks.pretrain import PretrainData
    from moerl.trainer.actor import Actor, PassSettings
    from moerl.trainer.critic import Critic
    from moerl.trainer.model import MoEArchitecture
    from moerl.trainer.parallel import ParallelLayout, ProcessGroups

log = logging.getLogger("moerl")


class NonFiniteTrainingError(RuntimeError):
    """Too many consecutive RL steps had a non-finite gradient (training.max_nonfinite_steps)."""


@dataclass
class Run:
    """Everything one training process holds."""

    config: Config
    layout: ParallelLayout
    groups: ProcessGroups
    dp: DataParallel  # the data-parallel group and this rank's rows
    arch: MoEArchitecture
    task: Task | None  # None in DPO mode
    pad_id: int
    actor: Actor
    settings: PassSettings  # how the actor's passes turn logits into log-probs
    critic: Critic | None
    objective: Objective
    rollout: RolloutManager | None  # on rank 0 of an RL run, None elsewhere
    ptx: PretrainData | None  # PPO-ptx pretraining data (algorithm.ptx_coef > 0)
    checkpoints: CheckpointManager
    telemetry: Telemetry
    lock: OutDirLock | None = None  # held by rank 0 for the whole run
    scorer: Scorer | None = None  # task.reward's sources (RL mode)
    custom_rollout: CustomRollout | None = None  # rollout.generate, on rank 0

    @property
    def is_driver(self) -> bool:
        return self.layout.rank == 0


# ============================================================================ the loop


def train(run: Run, start_step: int) -> None:
    cfg = run.config
    if start_step >= cfg.training.steps and run.is_driver:
        log.warning("%s already holds a finished run (step %d of training.steps=%d): nothing to "
                    "train; raise training.steps to continue it, or set training.out_dir for a "
                    "new run", cfg.training.out_dir, start_step, cfg.training.steps)
    nonfinite_streak = 0
    for step in range(start_step, cfg.training.steps):
        timer = StageTimer()
        with timer("eval"):
            eval_metrics = eval_stage(run, step)  # the policy every step starts from
        with timer("rollout"):
            batch, rollout_metrics = rollout_stage(run, step)
        with timer("reference"):
            reference_stage(run, batch)
        with timer("old_logprobs"):
            old_metrics = old_logprob_stage(run, batch)
        with timer("advantages"):
            value_stage(run, batch)
            compute_advantages(batch, run.objective)
        if cfg.logging.sample_dumps and run.is_driver:
            dump_samples(Path(cfg.training.out_dir) / "samples", step, batch, run.task.tokenizer)
        with timer("update"):
            update_metrics = update_stage(run, batch, step)
        with timer("weight_sync"):
            sync_stage(run, step + 1)
        metrics = {**rollout_metrics, **old_metrics, **update_metrics, **eval_metrics,
                   **timer.metrics()}
        run.telemetry.log(step, metrics)
        nonfinite_streak = nonfinite_streak + 1 if update_metrics["skipped"] else 0
        if nonfinite_streak > cfg.training.max_nonfinite_steps:
            _stop_nonfinite(run, step, nonfinite_streak)
        if run.checkpoints.due(step + 1):
            run.checkpoints.save(step + 1, run)
    if cfg.training.steps > start_step and cfg.training.eval_every:
        # The final policy's accuracy, as the record of step `steps` (no update in it).
        run.telemetry.log(cfg.training.steps, eval_stage(run, cfg.training.steps, force=True))


def _stop_nonfinite(run: Run, step: int, streak: int) -> None:
    """Skipped updates leave every weight as the last good step left it: save that, then stop."""
    run.checkpoints.save(step + 1, run)
    raise NonFiniteTrainingError(
        f"{streak} consecutive steps (up to step {step}) had a non-finite gradient and were "
        f"skipped, more than training.max_nonfinite_steps={run.config.training.max_nonfinite_steps}"
        f"; the last good weights are saved in {run.checkpoints.path(step + 1)}. Look for the "
        f"cause (a non-finite loss term, reward or reference log-prob; a too-high lr), then "
        f"rerun to resume from there")


# ============================================================================ stages


def rollout_stage(run: Run, step: int) -> tuple[RolloutBatch, dict]:
    """Rank 0 generates and scores; dynamic sampling refills; the batch goes to every rank (the
    routes and masks of a data-parallel rank's rows only to that rank, by default)."""
    batch, metrics = None, {}
    if run.is_driver:
        samples, metrics = _collect_samples(run, step)
        batch = pack_samples(samples, pad_id=run.pad_id,
                             pad_multiple=run.layout.tp, arch=run.arch)
    batch = send_batch(batch, transport=run.config.parallel.batch_transport, dp=run.dp,
                       world_group=run.groups.world)
    metrics = _broadcast_metrics(run, metrics)
    return batch, metrics


def _collect_samples(run: Run, step: int) -> tuple[list[Sample], dict]:
    cfg, task = run.config, run.task
    num_prompts = cfg.rollout.prompts_per_step
    prompts = task.prompts(step, num_prompts)
    reward_metrics: list[dict] = []
    samples = _generate(run, prompts, step=step * 1000, offset=0, reward_metrics=reward_metrics,
                        where=f"step {step}")
    all_scores = [s.reward for s in samples]
    rounds = 0
    if cfg.algorithm.dynamic_sampling:
        samples = _keep_informative(samples)
        while len(samples) < num_prompts * cfg.rollout.group_size and (
                rounds < cfg.algorithm.max_refill_rounds):
            rounds += 1
            # Fresh prompts for a refill round come from a separate stream of the same task.
            extra = task.prompts(10_000_000 + step * 64 + rounds, num_prompts)
            more = _generate(run, extra, step=step * 1000 + rounds, offset=rounds * num_prompts,
                             reward_metrics=reward_metrics, where=f"step {step} refill {rounds}")
            all_scores += [s.reward for s in more]
            samples = samples + _keep_informative(more)
        samples = samples[: num_prompts * cfg.rollout.group_size]
        if not samples:
            raise RuntimeError("dynamic sampling kept no group: every group's rewards were "
                               "equal in every round; raise max_refill_rounds or the group size")
    lengths = torch.tensor([len(s.response_ids) for s in samples], dtype=torch.float32)
    scores = torch.tensor(all_scores)
    return samples, {
        "score/mean": scores.mean().item(),
        "response_length/mean": lengths.mean().item(),
        "response_length/max": lengths.max().item(),
        "truncated_frac": sum(s.finish_reason == "length" for s in samples) / len(samples),
        "dynamic_sampling/refill_rounds": rounds,
        "dynamic_sampling/kept_frac": len(samples) / len(all_scores),
        "rollout/server_restarts": run.rollout.restarts,
        "rollout/servers_up": sum(run.rollout.fleet.up),
        "rollout/num_samples": len(samples),
        **merge_metrics(reward_metrics),
    }


def _generate(run: Run, prompts, *, step: int, offset: int, reward_metrics: list[dict],
              where: str, n: int | None = None, greedy: bool = False) -> list[Sample]:
    """Samples of ``prompts`` (single-turn, or rollout.generate's loop), scored by task.reward."""
    n = run.config.rollout.group_size if n is None else n
    if run.custom_rollout is not None:
        samples = run.custom_rollout.generate(run.rollout, prompts, n=n, step=step,
                                              group_offset=offset, greedy=greedy)
    else:
        samples = run.rollout.generate([list(p.ids) for p in prompts], n=n, step=step,
                                       group_offset=offset, greedy=greedy)
    reward_metrics.append(score_samples(run.scorer, run.task, prompts, samples, offset=offset,
                                        where=where))
    return samples


def _keep_informative(samples: list[Sample]) -> list[Sample]:
    rewards = torch.tensor([s.reward for s in samples])
    groups = torch.tensor([s.group_index for s in samples])
    keep = dynamic_sampling_keep(rewards, groups)
    return [s for s, k in zip(samples, keep.tolist()) if k]


def reference_stage(run: Run, batch: RolloutBatch) -> None:
    if not run.objective.uses_ref:
        return
    rows = run.dp.owned_rows(batch.batch_size)
    run.actor.compute_ref_logprobs(batch, rows, run.settings)
    run.dp.gather_rows(batch.ref_logprobs_BT)


def old_logprob_stage(run: Run, batch: RolloutBatch) -> dict:
    """pi_old (routing per mode, keep-mask per flag), mismatch and routing telemetry, and the
    rollout-correction weights. In bypass mode pi_old is the engine's log-probs: no forward."""
    if run.objective.bypass_old_logprobs:
        batch.old_logprobs_BT = batch.rollout_logprobs_BT.clone()
        return compute_rollout_weights(batch, run.objective)
    metrics = _old_logprob_pass(run, batch)
    return metrics | compute_rollout_weights(batch, run.objective)


def _old_logprob_pass(run: Run, batch: RolloutBatch) -> dict:
    from moerl.trainer.routing_replay import agreement_from_counts, routing_agreement_counts

    rows = run.dp.owned_rows(batch.batch_size)
    entropy_BT = run.actor.compute_old_logprobs(batch, rows, run.settings)
    run.dp.gather_rows(batch.old_logprobs_BT)
    run.dp.gather_rows(entropy_BT)
    mask = batch.response_mask_BT
    metrics = {f"mismatch/{k.removeprefix('mismatch_')}": v.item() for k, v in
               mismatch_metrics(batch.old_logprobs_BT, batch.rollout_logprobs_BT, mask).items()}
    metrics["entropy/old"] = ((entropy_BT * mask).sum() / mask.sum().clamp(min=1)).item()
    if batch.routes_BTLK is not None:
        # Routes exist for every real position but the last token of each sample.
        # Each rank holds routes of its own rows: counts add up over data-parallel ranks.
        positions = torch.arange(batch.seq_len)
        routed_bT = positions < (batch.prompt_lengths_B + batch.response_lengths_B - 1)[rows, None]
        heavy = batch.heavy_index(rows)
        counts = routing_agreement_counts(batch.trainer_routes_BTLK[heavy],
                                          batch.routes_BTLK[heavy], routed_bT)
        metrics.update(_mismatch_split(run, batch, rows, heavy, routed_bT))
        agreement = agreement_from_counts(run.dp.sum_(counts))
        per_layer = agreement.pop("layer_agreement")
        metrics.update({f"routing/{k}": v.item() for k, v in agreement.items()})
        # Keyed by hidden-layer index, so dense layers simply have no entry.
        metrics.update({f"routing/layer{layer}_agreement": v
                        for layer, v in zip(run.arch.moe_layer_ids, per_layer.tolist())})
    return metrics


def _mismatch_split(run: Run, batch: RolloutBatch, rows, heavy, routed_bT) -> dict:
    """moerl.mechanism's |log ratio| distribution and k3 split by routing, all DP ranks."""
    diff_layers_bT = route_diff_layers(batch.trainer_routes_BTLK[heavy], batch.routes_BTLK[heavy])
    logratio_bT = (batch.old_logprobs_BT - batch.rollout_logprobs_BT)[rows]
    num_layers = len(run.arch.moe_layer_ids)
    counts = mismatch_split_counts(logratio_bT, diff_layers_bT,
                                   batch.response_mask_BT[rows] & routed_bT, num_layers=num_layers)
    return mismatch_split_metrics(run.dp.sum_(counts), num_layers=num_layers)


def value_stage(run: Run, batch: RolloutBatch) -> None:
    if run.critic is None:
        return
    rows = run.dp.owned_rows(batch.batch_size)
    run.critic.compute_values(batch, rows, micro_batch_size=run.config.training.micro_batch_size)
    run.dp.gather_rows(batch.values_BT)


def update_stage(run: Run, batch: RolloutBatch, step: int) -> dict:
    """``epochs`` passes over the batch, each split into ``mini_batches`` optimizer steps."""
    cfg = run.config.training
    settings = run.settings
    per_step: list[dict] = []
    for epoch in range(cfg.epochs):
        for mine, mini in run.dp.mini_batches(batch.batch_size, cfg.mini_batches,
                                              seed=cfg.seed * 100_003 + step * 101 + epoch):
            tokens, seqs = _global_denominators(run, batch, mini)

            def loss_fn(mb, logprobs_BT, entropy_BT):
                loss, metrics = policy_loss(mb, logprobs_BT, entropy_BT, run.objective,
                                            global_num_tokens=tokens, global_num_seqs=seqs)
                return loss, metrics | update_sums(mb, logprobs_BT, run.objective,
                                                   global_num_tokens=tokens, global_num_seqs=seqs)

            result, metrics = run.actor.train_step(
                batch, mine, settings, loss_fn, with_entropy=run.objective.needs_entropy_grad,
                extra=_ptx_batch(run, step * 1000 + len(per_step), len(mini)))
            metrics = {k: v.item() for k, v in metrics.items()}
            metrics.update(grad_norm=result.grad_norm, skipped=float(not result.ok))
            if not result.ok:
                log.warning("step %d: optimizer step skipped: %s", step, result.skipped_reason)
            if run.critic is not None:
                # The critic fits every response token (overlong filtering is a policy choice).
                value_tokens = batch.response_mask_BT[mini].sum().float()
                metrics.update(run.critic.train_step(batch, mine, tokens=value_tokens,
                                                     micro_batch_size=cfg.micro_batch_size))
            per_step.append(metrics)
    merged = {k: sum(m[k] for m in per_step) / len(per_step) for k in per_step[0]}
    merged["skipped"] = sum(m["skipped"] for m in per_step)
    merged = run.dp.reduce_metrics(merged)
    sums = {k: merged.pop(k) for k in list(merged) if k.startswith("mech_sum/")}
    return merged | (grad_split_metrics(sums) if sums else {})


def _ptx_batch(run: Run, index: int, count: int):
    """PPO-ptx (InstructGPT eq. 2): as many pretraining samples as the mini-batch has RL samples,
    split over data-parallel ranks like the RL rows (so the run does not depend on the DP size),
    with a token-mean language-model loss scaled by ptx_coef, in the same optimizer step."""
    if run.ptx is None:
        return None
    full = run.ptx.batch(index, count, pad_multiple=run.layout.tp)
    batch = full.select(run.dp.owned_rows(full.batch_size), pad_multiple=run.layout.tp)
    tokens = full.response_mask_BT.sum().float()
    coef = run.config.algorithm.ptx_coef

    def loss_fn(mb, logprobs_BT, _entropy):
        loss = AGGREGATIONS["token_mean"](ptx_loss(logprobs_BT, mb.response_mask_BT, coef=coef),
                                          mb.response_mask_BT, global_num_tokens=tokens)
        return loss, {"ptx_loss": loss.detach()}

    return batch, loss_fn


def _global_denominators(run: Run, batch: RolloutBatch, rows: torch.Tensor):
    """Token and sequence counts of the whole mini-batch (all DP ranks), for loss aggregation."""
    mask = loss_mask(batch, run.objective)[rows]
    return local_denominators(mask)


def sync_stage(run: Run, version_step: int) -> None:
    """Push the updated weights; every rank takes part in the gathers, rank 0 sends."""
    tensors = run.actor.export_hf()
    if run.is_driver:
        run.rollout.push_weights(tensors, version=f"step-{version_step}")
    else:
        for _ in tensors:
            pass


def eval_stage(run: Run, step: int, *, force: bool = False) -> dict:
    """Greedy accuracy of the current policy on the task's fixed evaluation set, and pass@k /
    mean@k over task.eval_k samples per prompt at the rollout temperature."""
    every = run.config.training.eval_every
    if not force and (not every or step % every):
        return {}
    metrics = {}
    prompts = run.task.eval_set() if run.is_driver else []
    if prompts:
        t, scoring = run.config.task, []
        greedy = _generate(run, prompts, step=-step, offset=0, reward_metrics=scoring, n=1,
                           greedy=True, where=f"greedy eval at step {step}")
        sampled = _generate(run, prompts, step=-1_000_000 - step, offset=0,
                            reward_metrics=scoring, n=t.eval_k,
                            where=f"pass@k eval at step {step}") if t.eval_k else []
        metrics = eval_metrics(greedy, sampled, k=t.eval_k, threshold=t.pass_threshold)
        metrics["eval/reward_errors"] = merge_metrics(scoring)["reward/errors"]
    return _broadcast_metrics(run, metrics)


# ============================================================================ helpers


def _broadcast_metrics(run: Run, metrics: dict) -> dict:
    """Rank 0's scalar metrics on every rank."""
    return metrics if run.layout.world == 1 else broadcast_json(metrics, src=0)


# ============================================================================ set-up


def setup(cfg: Config) -> tuple[Run, int]:
    """Validate against the model, initialise parallelism, build actor/critic/server; resume."""
    from moerl.rollout.protocol import MoeLayout
    from moerl.rollout_manager import RolloutManager, SamplingSettings
    from moerl.launch_info import model_problems
    from moerl.trainer.actor import Actor, PassSettings
    from moerl.trainer.model import architecture_from_hf
    from moerl.trainer.parallel import init_parallel

    if cfg.model.dtype != "float32" and not torch.cuda.is_available():
        raise ConfigError(f"model.dtype={cfg.model.dtype} needs CUDA (megatron-core's "
                          f"mixed-precision optimizer checks for CUDA tensors): on CPU set "
                          f"model.dtype=float32")
    hf_path = Path(cfg.model.hf_path)
    if not (hf_path / "config.json").is_file():
        raise ConfigError(f"model.hf_path={cfg.model.hf_path} has no config.json; for the tiny "
                          f"default run `python -m moerl.warmstart --out {cfg.model.hf_path}` "
                          f"(launch/local.sh does this for you)")
    problems = model_problems(cfg)  # the same checks as launch/local.sh's pre-flight
    if problems:
        raise ConfigError("; ".join(problems))
    hf_config = json.loads((hf_path / "config.json").read_text())
    arch = architecture_from_hf(hf_config)
    p = cfg.parallel
    layout, groups = init_parallel(tp=p.tp, ep=p.ep, etp=p.etp, seed=cfg.training.seed,
                                   timeout_s=3600.0)
    out_dir = Path(cfg.training.out_dir)
    lock = None
    if layout.rank == 0:
        lock = OutDirLock(out_dir)  # before anything is written; one run per out_dir
        dump_yaml(cfg, out_dir / "config.yaml")
    t, rl = cfg.task, cfg.training.mode == "rl"
    task = build_task(t, model_dir=str(hf_path), max_prompt_tokens=max(
        1, arch.max_position_embeddings - cfg.rollout.max_new_tokens)) if rl else None
    if task is not None and task.tokenizer.vocab_size > arch.vocab_size:
        raise ConfigError(f"task {t.name}'s tokenizer has {task.tokenizer.vocab_size} ids but "
                          f"the model's vocabulary has {arch.vocab_size}")
    pad_id = task.tokenizer.pad_id if task is not None else (hf_config.get("pad_token_id") or 0)
    tr = cfg.training
    optim = dict(lr=tr.lr, weight_decay=tr.weight_decay, adam_beta1=tr.adam_beta1,
                 adam_beta2=tr.adam_beta2, clip_grad=tr.grad_clip, warmup_steps=tr.warmup_steps,
                 use_distributed_optimizer=p.distributed_optimizer,
                 bf16=cfg.model.dtype == "bfloat16", fp16=cfg.model.dtype == "float16")
    checkpoints = CheckpointManager(out_dir / "checkpoints", every=tr.checkpoint_every,
                                    final_step=tr.steps, layout=layout)
    resume_step = checkpoints.resume_step() if tr.resume else None  # verified, not loaded
    start_step = resume_step or 0
    rollout = starting = None
    rl_left = rl and start_step < tr.steps  # a finished run starts no server and pushes nothing
    byo = _bring_your_own(cfg, task) if layout.rank == 0 and rl_left else {}
    if layout.rank == 0 and rl_left:
        r = cfg.rollout
        sampling = SamplingSettings(temperature=r.temperature, top_p=r.top_p, top_k=r.top_k,
                                    min_p=r.min_p, max_new_tokens=r.max_new_tokens,
                                    stop_token_ids=(task.tokenizer.eos_id,))
        rollout = RolloutManager(
            builtin=r.server == "builtin", local_sglang=r.server == "sglang", url=r.url,
            api_key=r.api_key,
            engine_dtype=r.engine_dtype, concurrency=r.concurrency, timeout_s=r.timeout_s,
            max_retries=r.max_retries, seed=r.seed, sampling=sampling,
            layout=MoeLayout.from_hf_config(hf_config), return_routes=True,
            require_routes=cfg.algorithm.routing_replay == "r3",
            # Whenever the sampler truncates, the behaviour policy is the truncated one: ask for
            # its support and log-probs even without keep-mask, so that rollout_logprobs (the
            # mismatch telemetry, OPSM, TIS) are what the engine really sampled with.
            return_mask=cfg.algorithm.keep_sampling_mask or r.top_p < 1 or r.top_k > 0
            or r.min_p > 0, require_mask=cfg.algorithm.keep_sampling_mask,
            sync_method=cfg.weight_sync.method, bucket_mb=cfg.weight_sync.bucket_mb,
            sync_address=cfg.weight_sync.master_address, sync_port=cfg.weight_sync.master_port,
            run_dir=out_dir, hf_config_dir=str(hf_path),
            max_batch_size=r.engine_max_batch_size or min(256, r.prompts_per_step * r.group_size),
            num_servers=r.num_servers,
            urls=tuple(u.strip() for u in r.urls.split(",") if u.strip()),
            router_url=r.router_url)
        # The servers start while the trainer builds its models and loads its checkpoint:
        # both take long at scale (an SGLang start-up, a Megatron build), and neither waits
        # for the other.
        starting = rollout.start_in_background(hf_path, version="step-0")
    try:
        dispatcher = None if cfg.model.token_dispatcher == "auto" else cfg.model.token_dispatcher
        actor = Actor(arch=arch, layout=layout, groups=groups, hf_path=str(hf_path),
                      ref_path=cfg.model.ref_path, bf16=cfg.model.dtype == "bfloat16",
                      recompute=cfg.model.recompute, token_dispatcher=dispatcher, optim=optim,
                      fp16=cfg.model.dtype == "float16")
        critic = None
        if cfg.algorithm.advantage in CRITIC_ESTIMATORS:
            from moerl.trainer.critic import Critic

            critic = Critic(arch=arch, layout=layout, groups=groups,
                            hf_path=cfg.model.critic_path or str(hf_path),
                            bf16=cfg.model.dtype == "bfloat16", token_dispatcher=dispatcher,
                            optim={**optim, "lr": cfg.algorithm.critic_lr},
                            value_clip=cfg.algorithm.value_clip, fp16=cfg.model.dtype == "float16")
        objective = Objective.from_config(cfg.algorithm, cfg.rollout)
        ptx = None
        if cfg.algorithm.ptx_coef > 0 and rl:
            from moerl.tasks.pretrain import PretrainData

            ptx = PretrainData(cfg.algorithm.ptx_path, tokenizer=task.tokenizer,
                               max_len=arch.max_position_embeddings, seed=cfg.training.seed)
        if resume_step is not None:
            checkpoints.load_intact(resume_step, actor, critic)
    except BaseException:
        if starting is not None:
            starting.abandon()
        raise
    if starting is not None:
        starting.result()  # the start-up's own error, if any (it closed what it started)
    telemetry = Telemetry(out_dir, total_steps=tr.steps, start_step=start_step,
                          tensorboard=cfg.logging.tensorboard, progress=cfg.logging.progress,
                          enabled=layout.rank == 0, wandb=_wandb_settings(cfg))
    run = Run(config=cfg, layout=layout, groups=groups, dp=DataParallel.from_layout(layout, groups),
              arch=arch, task=task, pad_id=pad_id,
              actor=actor, settings=PassSettings.from_config(cfg), critic=critic,
              objective=objective, rollout=rollout, ptx=ptx,
              checkpoints=checkpoints,
              telemetry=telemetry, lock=lock, **byo)
    if rl_left and (start_step > 0 or cfg.rollout.server == "external"):
        # The built-in server starts from hf_path, which is the policy of a fresh run; after a
        # resume, or with an external server whose weights the trainer cannot vouch for, the
        # trainer's own weights go over first.
        sync_stage(run, start_step)
    return run, start_step


def _bring_your_own(cfg: Config, task: Task) -> dict:
    """Rank 0's reward scorer and custom rollout, as Run fields (ConfigError when they cannot
    be built: a bad import path, a missing package)."""
    from moerl.custom_rollout import CustomRollout
    from moerl.rewards import Scorer, build_sources

    t = cfg.task
    try:
        sources = build_sources(t.reward, task=task, batched=t.reward_batched,
                                retries=t.reward_retries, timeout_s=t.reward_timeout_s)
        custom = None
        if cfg.rollout.generate:
            custom = CustomRollout(cfg.rollout.generate, tokenizer=task.tokenizer,
                                   concurrency=cfg.rollout.concurrency)
    except ValueError as err:
        raise ConfigError(str(err)) from None
    scorer = Scorer(sources, on_error=t.reward_on_error, timeout_s=t.reward_timeout_s,
                    concurrency=t.reward_concurrency)
    return {"scorer": scorer, "custom_rollout": custom}


def _wandb_settings(cfg: Config) -> dict | None:
    lg = cfg.logging
    if not lg.wandb:
        return None
    return {"project": lg.wandb_project, "mode": lg.wandb_mode, "config": to_dict(cfg),
            "name": Path(cfg.training.out_dir).name}


def _quiet_megatron(level: str) -> None:
    """Megatron logs its full configs at INFO and warns about CPU-only facts moerl expects
    (no Apex/TE, SP disabled for the experts' TP of 1): keep them out of the console."""
    if level != "debug":
        logging.getLogger("megatron").setLevel(logging.WARNING)
    for pattern in (r".*Apex is not installed", r".*Transformer Engine and Apex are not installed",
                    r".*full scope is deprecated", r".*tensor model parallel size is 1",
                    r".*CUDA_DEVICE_MAX_CONNECTIONS"):
        warnings.filterwarnings("ignore", message=pattern)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="moerl.train", description=__doc__.split("\n\n")[0])
    add_cli_arguments(parser)
    args = parser.parse_args(argv)
    if args.options:
        print(describe_options())
        return 0
    try:
        cfg = config_from_args(args)
        check_megatron_version()
    except (ConfigError, UnsupportedMegatronError) as err:
        print(f"moerl: {err}", file=sys.stderr)
        return 2
    if os.environ.get("TORCHELASTIC_RUN_ID"):
        exit_with_launcher()  # torchrun's own session would otherwise outlive a killed launcher
    logging.basicConfig(level=cfg.logging.log_level.upper(),
                        format="%(asctime)s %(name)s %(levelname)s %(message)s")
    _quiet_megatron(cfg.logging.log_level)
    from moerl.trainer.parallel import destroy_parallel

    run = None
    try:
        run, start_step = setup(cfg)
        hf_out = Path(cfg.training.out_dir) / "hf"
        # Decided before training, identically on every rank (save_hf is collective); a rerun
        # of a finished run rewrites nothing.
        write_hf = start_step < cfg.training.steps or not (hf_out / "config.json").exists()
        if cfg.training.mode == "dpo":
            from moerl.dpo import train_dpo

            train_dpo(run, start_step)
        else:
            train(run, start_step)
        if write_hf:
            run.actor.save_hf(hf_out)  # the trained policy, HF format
    except ConfigError as err:
        print(f"moerl: {err}", file=sys.stderr)
        return 2
    except NonFiniteTrainingError as err:
        if run is not None and run.is_driver:
            print(f"moerl: {err}", file=sys.stderr)
        return 1
    except RewardError as err:  # task.reward_on_error=fail: the message names the sample
        print(f"moerl: {err}", file=sys.stderr)
        return 1
    finally:
        if run is not None:
            run.telemetry.close()
            if run.rollout is not None:
                run.rollout.close()
            if run.lock is not None:
                run.lock.release()
        destroy_parallel()
    return 0


if __name__ == "__main__":
    sys.exit(main())
