"""Statistics of tools/compare.py: paired differences over seeds, and the collapse rule.

Every arm runs the same seeds (same prompts, same sampling seeds, same initial weights), so arms
are compared seed by seed: the difference ``d_s = metric(arm A, seed s) - metric(arm B, seed s)``
removes what the seeds share, and its mean gets a confidence interval two ways:

- paired t: ``mean(d) +- t_{1-alpha/2, n-1} * sd(d) / sqrt(n)`` (Student, exact for normal
  differences; the primary interval);
- paired bootstrap: percentile interval of the mean of ``n`` differences resampled with
  replacement (10,000 resamples, fixed seed). With 3 seeds it has only 10 distinct values: read
  it as a check on the t interval, not as a better one.

The collapse rule is fixed before any run (pre-registered here and in the README): a run
**collapses at eval step s** when its greedy evaluation accuracy at s and at every later
evaluation is below ``COLLAPSE_FRACTION`` (one half) of its accuracy at step 0 (the warm start),
or when its training stops producing finite gradient norms (every step from s on has a
non-finite mean gradient norm). Steps-to-collapse is that s; a run that recovers above the
line did not collapse.

Pure Python (no numpy/scipy): importable anywhere the report is read.
"""

from __future__ import annotations

import math
import random
import statistics

COLLAPSE_FRACTION = 0.5
BOOTSTRAP_RESAMPLES = 10_000


def t_quantile(p: float, df: int) -> float:
    """Student-t quantile ``t_{p, df}`` (``0.5 < p < 1``) by bisection on the CDF, itself a
    Simpson integral of the density (accurate to ~1e-7 for the df of a seed study)."""
    if not 0.5 < p < 1 or df < 1:
        raise ValueError(f"need 0.5 < p < 1 and df >= 1, got p={p}, df={df}")
    log_norm = math.lgamma((df + 1) / 2) - math.lgamma(df / 2) - 0.5 * math.log(df * math.pi)

    def cdf(x: float, n: int = 1000) -> float:
        h = x / n
        total = 0.0
        for i in range(n + 1):
            y = math.exp(log_norm - (df + 1) / 2 * math.log1p((i * h) ** 2 / df))
            total += y * (1 if i in (0, n) else 4 if i % 2 else 2)
        return 0.5 + total * h / 3

    lo, hi = 0.0, 1.0
    while cdf(hi) < p:
        lo, hi = hi, hi * 2
    for _ in range(60):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if cdf(mid) < p else (lo, mid)
    return (lo + hi) / 2


def paired_difference(a: list[float], b: list[float], *, confidence: float = 0.95,
                      seed: int = 0) -> dict[str, float]:
    """Mean of the per-seed differences ``a[i] - b[i]`` with paired-t and bootstrap intervals.

    ``a`` and ``b`` are one metric per seed, in the same seed order. Seeds where either value is
    not finite are dropped (``n`` says how many were used). Returns ``mean``, ``n``, ``t_low``,
    ``t_high``, ``boot_low``, ``boot_high`` (NaN intervals with fewer than 2 usable seeds) and
    ``significant`` (1.0 when the t interval excludes 0).
    """
    if len(a) != len(b):
        raise ValueError(f"paired samples need one value per seed in both arms: {len(a)} vs "
                         f"{len(b)}")
    diffs = [x - y for x, y in zip(a, b) if math.isfinite(x) and math.isfinite(y)]
    n = len(diffs)
    nan = math.nan
    out = {"mean": statistics.fmean(diffs) if diffs else nan, "n": float(n), "t_low": nan,
           "t_high": nan, "boot_low": nan, "boot_high": nan, "significant": 0.0}
    if n < 2:
        return out
    half = t_quantile(0.5 + confidence / 2, n - 1) * statistics.stdev(diffs) / math.sqrt(n)
    out["t_low"], out["t_high"] = out["mean"] - half, out["mean"] + half
    rng = random.Random(seed)
    means = sorted(statistics.fmean(rng.choices(diffs, k=n)) for _ in range(BOOTSTRAP_RESAMPLES))
    tail = (1 - confidence) / 2
    out["boot_low"] = means[int(tail * (BOOTSTRAP_RESAMPLES - 1))]
    out["boot_high"] = means[int(math.ceil((1 - tail) * (BOOTSTRAP_RESAMPLES - 1)))]
    out["significant"] = float(out["t_low"] > 0 or out["t_high"] < 0)
    return out


def steps_to_collapse(records: list[dict]) -> int | None:
    """The pre-registered collapse rule (module docstring) on one run's ``metrics.jsonl``
    records; the collapse step, or None for a run that did not collapse."""
    evals = [(r["step"], r["eval/accuracy"]) for r in records
             if isinstance(r.get("eval/accuracy"), (int, float))]
    collapsed_at = None
    if evals and evals[0][0] == 0:
        line = COLLAPSE_FRACTION * evals[0][1]
        for step, accuracy in reversed(evals[1:]):
            if accuracy >= line:
                break
            collapsed_at = step
    train = [r for r in records if "grad_norm" in r]
    dead_from = None
    for r in reversed(train):
        g = r["grad_norm"]
        if isinstance(g, (int, float)) and math.isfinite(g):  # JSON writes NaN as "nan"
            break
        dead_from = r["step"]
    found = [s for s in (collapsed_at, dead_from) if s is not None]
    return min(found) if found else None
