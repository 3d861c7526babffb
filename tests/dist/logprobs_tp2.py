"""TP=2 check for moerl.trainer.logprobs, run under torchrun by tests/test_logprobs.py.

Every rank builds the same random case (full-vocabulary, single-id and multi-id kept rows), keeps
its vocabulary shard of the logits, and computes log-probs (several temperatures) and entropy with
their gradients; rank 0 gathers the shard gradients and compares values and gradients with the
same functions run on the whole vocabulary in one process (tp_group=None) within 1e-6. The same
holds with Megatron's vocabulary padding (``vocab_size`` < the logits' width, padded columns holding
huge logits), whose columns must get exactly zero gradient. Then both
ranks must raise the same ValueError on a bad mask and still meet at a barrier (no hang).
Prints "LOGPROBS TP2 OK rank <r>" on success.
"""

from __future__ import annotations

import sys

import torch
import torch.distributed as dist

from moerl.trainer.logprobs import vocab_parallel_entropy, vocab_parallel_logprobs


def make_case(seed: int, num_rows: int, vocab: int):
    """Logits [N, V], targets [N], CSR keep-mask mixing all row kinds; the same on every rank."""
    gen = torch.Generator().manual_seed(seed)
    logits = torch.randn(num_rows, vocab, generator=gen) * 3.0
    targets = torch.randint(0, vocab, (num_rows,), generator=gen)
    rows = []
    for n in range(num_rows):
        kind = n % 4
        if kind == 0:
            rows.append([])  # no mask: full vocabulary
        elif kind == 1:
            rows.append([int(targets[n])])  # greedy-like: logp == 0
        else:
            size = int(torch.randint(2, vocab, (1,), generator=gen))
            others = [i for i in torch.randperm(vocab, generator=gen).tolist()
                      if i != int(targets[n])][:size - 1]
            row = others + [int(targets[n])]
            rows.append([row[i] for i in torch.randperm(len(row), generator=gen).tolist()])
    ids = torch.tensor([i for r in rows for i in r], dtype=torch.int32)
    offsets = torch.zeros(num_rows + 1, dtype=torch.int64)
    offsets[1:] = torch.tensor([len(r) for r in rows]).cumsum(0)
    return logits, targets, ids, offsets


def run(fn, logits, weights):
    leaf = logits.clone().requires_grad_()
    out = fn(leaf)
    (out * weights).sum().backward()
    return out.detach(), leaf.grad


def gathered(t: torch.Tensor, group) -> torch.Tensor:
    parts = [torch.empty_like(t) for _ in range(dist.get_world_size(group))]
    dist.all_gather(parts, t.contiguous(), group=group)
    return torch.cat(parts, dim=1)


def padded_checks(rank: int, tp_group, real_vocab: int, num_rows: int, width: int, weights):
    """Megatron's vocabulary padding: logits ``[N, width]`` whose columns from ``real_vocab`` on are
    padding with huge values; with ``vocab_size=real_vocab`` every result must equal the unpadded
    single-process one and the padded columns must get exactly zero gradient."""
    logits, targets, ids, offsets = make_case(99 + real_vocab, num_rows, real_vocab)
    padded = torch.cat([logits, torch.full((num_rows, width - real_vocab), 50.0)], dim=1)
    shard = width // 2
    local = padded[:, rank * shard:(rank + 1) * shard]
    checks = []
    for masked in (True, False):
        kw = dict(temperature=0.8, kept_ids_M=ids if masked else None,
                  kept_offsets_N1=offsets if masked else None)
        tp_out, tp_grad = run(lambda x: vocab_parallel_logprobs(  # noqa: B023
            x, targets, tp_group=tp_group, vocab_size=real_vocab, **kw), local, weights)
        ref_out, ref_grad = run(lambda x: vocab_parallel_logprobs(  # noqa: B023
            x, targets, tp_group=None, **kw), logits, weights)
        full_grad = gathered(tp_grad, tp_group)
        checks.append((f"padded V={real_vocab} logprobs masked={masked}", tp_out, ref_out,
                       full_grad[:, :real_vocab], ref_grad))
        checks.append((f"padded V={real_vocab} logprobs masked={masked}: padding grad",
                       full_grad[:, real_vocab:], torch.zeros(num_rows, width - real_vocab),
                       full_grad[:, :1] * 0, ref_grad[:, :1] * 0))
    tp_out, tp_grad = run(lambda x: vocab_parallel_entropy(
        x, tp_group=tp_group, temperature=0.8, vocab_size=real_vocab), local, weights)
    ref_out, ref_grad = run(lambda x: vocab_parallel_entropy(x, tp_group=None, temperature=0.8),
                            logits, weights)
    full_grad = gathered(tp_grad, tp_group)
    checks.append((f"padded V={real_vocab} entropy", tp_out, ref_out, full_grad[:, :real_vocab],
                   ref_grad))
    checks.append((f"padded V={real_vocab} entropy: padding grad", full_grad[:, real_vocab:],
                   torch.zeros(num_rows, width - real_vocab), full_grad[:, :1] * 0,
                   ref_grad[:, :1] * 0))
    return checks


def main() -> int:
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    tp_group = dist.new_group([0, 1])
    num_rows, vocab = 24, 64
    shard = vocab // 2
    logits, targets, ids, offsets = make_case(1234, num_rows, vocab)
    weights = torch.randn(num_rows, generator=torch.Generator().manual_seed(7))
    local = logits[:, rank * shard:(rank + 1) * shard]
    checks = []
    for temperature in (1.0, 0.6, 1.7):
        for masked in (True, False):
            kw = dict(temperature=temperature, kept_ids_M=ids if masked else None,
                      kept_offsets_N1=offsets if masked else None)
            tp_out, tp_grad = run(lambda x: vocab_parallel_logprobs(  # noqa: B023
                x, targets, tp_group=tp_group, **kw), local, weights)
            ref_out, ref_grad = run(lambda x: vocab_parallel_logprobs(  # noqa: B023
                x, targets, tp_group=None, **kw), logits, weights)
            checks.append((f"logprobs T={temperature} masked={masked}", tp_out, ref_out,
                           gathered(tp_grad, tp_group), ref_grad))
        tp_out, tp_grad = run(lambda x: vocab_parallel_entropy(  # noqa: B023
            x, tp_group=tp_group, temperature=temperature), local, weights)
        ref_out, ref_grad = run(lambda x: vocab_parallel_entropy(  # noqa: B023
            x, tp_group=None, temperature=temperature), logits, weights)
        checks.append((f"entropy T={temperature}", tp_out, ref_out, gathered(tp_grad, tp_group),
                       ref_grad))
    failures = []
    worst = 0.0
    for name, tp_out, ref_out, tp_grad, ref_grad in checks:
        out_err = (tp_out - ref_out).abs().max().item()
        grad_err = (tp_grad - ref_grad).abs().max().item()
        worst = max(worst, out_err, grad_err)
        if not (out_err <= 1e-6 and grad_err <= 1e-6):
            failures.append(f"{name}: value err {out_err:.3g}, grad err {grad_err:.3g}")

    for real_vocab in (61, 29):  # padding inside rank 1's shard; rank 1's shard all padding
        checks += padded_checks(rank, tp_group, real_vocab, num_rows, vocab, weights)

    bad_targets = targets.clone()
    bad_targets[1] = (bad_targets[1] + 1) % vocab  # row 1 keeps only the old target
    try:
        vocab_parallel_logprobs(local, bad_targets, tp_group=tp_group, kept_ids_M=ids,
                                kept_offsets_N1=offsets)
        failures.append("a target outside its kept row was accepted")
    except ValueError as err:
        if "not in their keep-mask row" not in str(err):
            failures.append(f"unexpected error message: {err}")
    dist.barrier(group=tp_group)

    for line in failures:
        print(f"rank {rank} FAIL {line}", flush=True)
    if not failures:
        print(f"LOGPROBS TP2 OK rank {rank} ({len(checks)} checks, max err {worst:.2g})",
              flush=True)
    dist.destroy_process_group()
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
