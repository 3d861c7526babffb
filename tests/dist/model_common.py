"""Shared pieces of the spawned distributed test scripts (``tests/dist/*.py``) and their launcher.

The scripts run under torchrun on gloo; the tests in ``tests/`` start them with :func:`torchrun`
(which has a timeout, so a hang fails the test) and check what they wrote to an output folder.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

BATCH, SEQ = 4, 16  # SEQ is a multiple of every TP size the tests use (sequence parallelism)
LR, WD, EPS = 1e-3, 0.1, 1e-8  # AdamW of tests/dist/model_train.py


def torchrun(script: str, *args: str, nproc: int, timeout_s: float = 240.0) -> str:
    """Run ``tests/dist/<script>`` under torchrun (--standalone: a free port per run).

    Raises AssertionError with the output tail on failure or timeout.
    """
    from e2e_util import run  # tests/: the test fork server, or torchrun itself

    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone",
           f"--nproc_per_node={nproc}", str(Path(__file__).parent / script), *args]
    try:
        proc = run(cmd, timeout=timeout_s, env={"PYTHONWARNINGS": "ignore"}, check=False)
    except subprocess.TimeoutExpired as exc:
        out = (exc.stdout or b"").decode(errors="replace") if isinstance(exc.stdout, bytes) else (
            exc.stdout or "")
        raise AssertionError(f"{script} timed out after {timeout_s}s:\n{out[-4000:]}") from exc
    if proc.returncode != 0:
        raise AssertionError(f"{script} failed ({proc.returncode}):\n"
                             f"{(proc.stdout + proc.stderr)[-6000:]}")
    return proc.stdout


def init_layout(tp: int, ep: int, etp: int = 1):
    """(Re-)initialise Megatron's groups for a layout inside one torchrun world."""
    from megatron.core import parallel_state as ps
    from megatron.core.transformer.moe.router_replay import RouterReplay

    from moerl.trainer.parallel import init_parallel

    if ps.model_parallel_is_initialized():
        ps.destroy_model_parallel()
    # A second model in one process breaks RouterReplay's global bookkeeping (see COMMON.md).
    RouterReplay.clear_global_router_replay_instances()
    return init_parallel(tp=tp, ep=ep, etp=etp, seed=1234)


def load_arch(ckpt: str):
    from moerl.trainer.model import architecture_from_hf

    return architecture_from_hf(json.loads((Path(ckpt) / "config.json").read_text()))


def fixed_batch(vocab_size: int):
    import torch

    g = torch.Generator().manual_seed(7)
    ids = torch.randint(0, vocab_size, (BATCH, SEQ), generator=g)
    return ids, torch.arange(SEQ).expand(BATCH, SEQ)


def target_logprobs(model, ids, positions, tp: int, vocab_size: int):
    """log p(ids[:, t+1] | ids[:, :t+1]) [b, s-1] in fp32, vocab shards gathered across TP and
    Megatron's vocabulary padding (columns from ``vocab_size`` on) dropped.

    The gather is Megatron's autograd all-gather (backward keeps this rank's vocab slice), so the
    result can be backpropagated; a simple gather is enough for tests (the trainer's vocab-parallel
    log-prob kernel lives elsewhere).
    """
    import torch
    from megatron.core.tensor_parallel import gather_from_tensor_model_parallel_region

    logits = model(ids, positions, attention_mask=None)
    if tp > 1:
        logits = gather_from_tensor_model_parallel_region(logits)
    logp = torch.log_softmax(logits[..., :vocab_size].float(), dim=-1)[:, :-1]
    return logp.gather(-1, ids[:, 1:, None]).squeeze(-1)


def hf_target_logprobs(ckpt: Path):
    """transformers' fp32 (eager attention) log-probs of :func:`fixed_batch`'s next tokens
    ``[b, s-1]``: the reference the Megatron side's :func:`target_logprobs` is held to."""
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(ckpt, dtype=torch.float32,
                                                 attn_implementation="eager")
    ids, _ = fixed_batch(model.config.vocab_size)
    with torch.no_grad():
        logp = torch.log_softmax(model(ids).logits.float(), dim=-1)[:, :-1]
    return logp.gather(-1, ids[:, 1:, None]).squeeze(-1)


def export_dict(model, arch, layout, groups, source: str = "param") -> dict:
    from moerl.trainer.hf_bridge import export_hf_weights

    return {name: t.detach().clone() for name, t in
            export_hf_weights(model, arch, layout, groups=groups, source=source)}


def write_json(path: Path, obj) -> None:
    path.write_text(json.dumps(obj, indent=1, sort_keys=True))
