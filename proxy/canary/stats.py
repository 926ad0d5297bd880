"""The statistical judge's mathematics: pure functions on counts, no I/O, no scipy.

Two questions, each asked sequentially so that looking at every check is safe:

- **Errors.** Given that v1 and v2 together made ``x`` errors, v2's share of them is
  Binomial(x, n2 / (n1 + n2)) when both have the same error rate. If v2's rate is ``rho`` times v1's,
  the share's probability becomes ``rho n2 / (rho n2 + n1)``. The likelihood ratio of the two,
  multiplied over the checks and mixed over a fixed grid of ratios, is a non-negative martingale
  under "same rate", so by Ville's inequality it ever reaches ``1 / alpha`` with probability at most
  ``alpha``, however often it is looked at. Each check multiplies in only its own new seconds with
  their own split, so a split that changes between checks keeps the test exact.
- **Latency.** Mann-Whitney on the two bucket histograms of each check's new seconds (mid-ranks for
  the ties a histogram is made of), giving the probability of superiority ``theta`` ("a v2 request
  is slower than a v1 request in theta of the pairs", ties counted half). The per-check estimates
  are pooled by their null variances and judged with a one-sided mixture SPRT (mSPRT, a half-normal
  mixture over "v2 slower" only), valid at every look in the same sense (asymptotically normal).

Power ("enough data") asks: with the counts so far, would the configured smallest effect worth
catching have crossed the threshold with the wanted probability? Too little data holds; it never
passes.

The helpers (incomplete beta, Clopper-Pearson) are here because scipy is too heavy to load in a
proxy; the tests check every one of them against scipy.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from statistics import NormalDist

_NORMAL = NormalDist()

# --- special functions ---------------------------------------------------------------------------


def _betacf(a: float, b: float, x: float) -> float:
    """Continued fraction of the incomplete beta function (modified Lentz)."""
    tiny = 1e-300
    qab, qap, qam = a + b, a + 1.0, a - 1.0
    c, d = 1.0, 1.0 - qab * x / qap
    d = 1.0 / (d if abs(d) > tiny else tiny)
    h = d
    for m in range(1, 10_000):
        m2 = 2 * m
        aa = m * (b - m) * x / ((qam + m2) * (a + m2))
        d = 1.0 + aa * d
        d = 1.0 / (d if abs(d) > tiny else tiny)
        c = 1.0 + aa / c
        c = c if abs(c) > tiny else tiny
        h *= d * c
        aa = -(a + m) * (qab + m) * x / ((a + m2) * (qap + m2))
        d = 1.0 + aa * d
        d = 1.0 / (d if abs(d) > tiny else tiny)
        c = 1.0 + aa / c
        c = c if abs(c) > tiny else tiny
        delta = d * c
        h *= delta
        if abs(delta - 1.0) < 1e-15:
            break
    return h


def betainc(a: float, b: float, x: float) -> float:
    """Regularized incomplete beta I_x(a, b) (``scipy.special.betainc``)."""
    if not (a > 0 and b > 0):
        raise ValueError("betainc needs a > 0 and b > 0")
    if x <= 0.0:
        return 0.0
    if x >= 1.0:
        return 1.0
    log_front = math.lgamma(a + b) - math.lgamma(a) - math.lgamma(b) + a * math.log(x) + b * math.log1p(-x)
    front = math.exp(log_front)
    if x < (a + 1.0) / (a + b + 2.0):
        return min(1.0, front * _betacf(a, b, x) / a)
    return max(0.0, 1.0 - front * _betacf(b, a, 1.0 - x) / b)


def beta_ppf(q: float, a: float, b: float) -> float:
    """The x with I_x(a, b) = q: Newton steps on the beta density, kept inside a bisection bracket
    (a step leaving the bracket is replaced by halving), so it always converges."""
    lo, hi = 0.0, 1.0
    x = a / (a + b)
    log_norm = math.lgamma(a + b) - math.lgamma(a) - math.lgamma(b)
    for _ in range(200):
        f = betainc(a, b, x) - q
        if abs(f) < 1e-13:
            return x
        if f < 0:
            lo = x
        else:
            hi = x
        density = math.exp(log_norm + (a - 1) * math.log(x) + (b - 1) * math.log1p(-x))
        step = x - f / density if density > 0 else -1.0
        x = step if lo < step < hi else (lo + hi) / 2
        if hi - lo < 1e-15:
            break
    return x


def binom_sf(k: int, n: int, p: float) -> float:
    """P(X >= k) for X ~ Binomial(n, p) (``scipy.stats.binom.sf(k - 1, n, p)``)."""
    if k <= 0:
        return 1.0
    if k > n:
        return 0.0
    return betainc(k, n - k + 1, p)


def clopper_pearson(x: int, n: int, confidence: float = 0.95) -> tuple[float, float]:
    """Exact (conservative) interval for a binomial proportion (``binomtest(...).proportion_ci``)."""
    if n <= 0:
        return (0.0, 1.0)
    tail = (1 - confidence) / 2
    lo = 0.0 if x == 0 else beta_ppf(tail, x, n - x + 1)
    hi = 1.0 if x == n else beta_ppf(1 - tail, x + 1, n - x)
    return (lo, hi)


def log_normal_cdf(z: float) -> float:
    """log(Phi(z)) without underflow far in the left tail."""
    if z > -30:
        return math.log(max(0.5 * math.erfc(-z / math.sqrt(2)), 1e-320))
    return -0.5 * z * z - math.log(-z) - 0.5 * math.log(2 * math.pi)


def logsumexp(values: Sequence[float]) -> float:
    top = max(values)
    if top == -math.inf:
        return top
    return top + math.log(sum(math.exp(v - top) for v in values))


# --- Mann-Whitney on bucket histograms -----------------------------------------------------------


@dataclass(frozen=True, slots=True)
class MannWhitney:
    """U counts the (v1, v2) pairs where v2 is slower, ties (same bucket) counted half."""

    n1: int
    n2: int
    u: float
    var_null: float  # tie-corrected variance of U when both come from the same distribution

    @property
    def theta(self) -> float:
        """Probability of superiority: P(v2 slower than v1) + half of P(same bucket)."""
        return self.u / (self.n1 * self.n2) if self.n1 and self.n2 else 0.5

    @property
    def z(self) -> float:
        if self.var_null <= 0:
            return 0.0
        return (self.u - self.n1 * self.n2 / 2) / math.sqrt(self.var_null)

    @property
    def p_greater(self) -> float:
        """One-sided normal p-value for "v2 slower" (no continuity correction)."""
        return 1.0 - _NORMAL.cdf(self.z)


def mann_whitney(h1: Sequence[int], h2: Sequence[int]) -> MannWhitney:
    """Mann-Whitney U of v2 against v1 from their bucket counts (same bucket layout)."""
    if len(h1) != len(h2):
        raise ValueError("histograms of different bucket layouts")
    n1, n2 = sum(h1), sum(h2)
    n = n1 + n2
    u = 0.0
    below = 0
    ties = 0
    for c1, c2 in zip(h1, h2, strict=True):
        u += c2 * (below + 0.5 * c1)
        below += c1
        t = c1 + c2
        ties += t * t * t - t
    if n1 == 0 or n2 == 0 or n < 2:
        return MannWhitney(n1, n2, u, 0.0)
    var = n1 * n2 / 12.0 * ((n + 1) - ties / (n * (n - 1)))
    return MannWhitney(n1, n2, u, max(var, 0.0))


def superiority_ci(h1: Sequence[int], h2: Sequence[int], confidence: float = 0.95) -> tuple[float, float]:
    """DeLong's interval for theta from the placement values (no null assumption), clipped to [0, 1]."""
    n1, n2 = sum(h1), sum(h2)
    if n1 < 2 or n2 < 2:
        return (0.0, 1.0)
    above2 = n2
    below1 = 0
    place2: list[tuple[int, float]] = []  # (count of v2 in the bucket, share of v1 faster + half ties)
    place1: list[tuple[int, float]] = []  # (count of v1 in the bucket, share of v2 slower + half ties)
    for c1, c2 in zip(h1, h2, strict=True):
        above2 -= c2
        place2.append((c2, (below1 + 0.5 * c1) / n1))
        place1.append((c1, (above2 + 0.5 * c2) / n2))
        below1 += c1
    theta = sum(c * p for c, p in place2) / n2
    var2 = sum(c * (p - theta) ** 2 for c, p in place2) / (n2 - 1)
    var1 = sum(c * (p - theta) ** 2 for c, p in place1) / (n1 - 1)
    half = _NORMAL.inv_cdf(0.5 + confidence / 2) * math.sqrt(var2 / n2 + var1 / n1)
    return (max(0.0, theta - half), min(1.0, theta + half))


def scaled_superiority(h1: Sequence[int], bounds: Sequence[float], factor: float) -> float:
    """theta if v2 were v1 with every latency multiplied by ``factor``, seen through the buckets.

    v1's CDF is taken linear inside each bucket (as ``histogram_quantile`` does); the overflow bucket
    stays overflow. This turns "20% slower" into the Mann-Whitney effect it would show on this
    traffic, ties included, for the power calculation.
    """
    n1 = sum(h1)
    if n1 == 0:
        return 0.5
    cdf_at = [0.0]
    for count in h1[: len(bounds)]:
        cdf_at.append(cdf_at[-1] + count / n1)
    edges = [0.0, *bounds]

    def cdf(x: float) -> float:
        if x <= 0:
            return 0.0
        if x >= edges[-1]:
            return cdf_at[-1]
        for i in range(1, len(edges)):
            if x <= edges[i]:
                lo, hi = edges[i - 1], edges[i]
                return cdf_at[i - 1] + (cdf_at[i] - cdf_at[i - 1]) * (x - lo) / (hi - lo)
        return cdf_at[-1]  # pragma: no cover - the loop always returns

    theta = 0.0
    below = 0.0
    previous = 0.0
    for i in range(len(bounds) + 1):
        shifted = cdf(bounds[i] / factor) if i < len(bounds) else 1.0
        q = shifted - previous
        previous = shifted
        p1 = h1[i] / n1
        theta += q * (below + 0.5 * p1)
        below += p1
    return theta


# --- errors: the conditional binomial, sequential ------------------------------------------------


def error_grid(min_ratio: float) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Rate ratios mixed over, and their weights: most on the smallest ratio worth catching."""
    multiples = (0.75, 1.0, 1.5, 2.5, 5.0)
    weights = (0.05, 0.75, 0.1, 0.05, 0.05)
    ratios = tuple(max(1.05, min_ratio * m) for m in multiples)
    return ratios, weights


def share_under(ratio: float, n1: float, n2: float) -> float:
    """v2's expected share of the errors when its rate is ``ratio`` times v1's."""
    return ratio * n2 / (ratio * n2 + n1)


def error_log_lr(ratio: float, n1: int, x1: int, n2: int, x2: int) -> float:
    """log likelihood ratio, "v2's rate is ratio x v1's" against "same rate", of one increment."""
    if x1 + x2 == 0 or n1 <= 0 or n2 <= 0:
        return 0.0  # no errors, or one version without traffic: the increment says nothing
    p0 = n2 / (n1 + n2)
    p = share_under(ratio, n1, n2)
    return x2 * math.log(p / p0) + x1 * math.log((1 - p) / (1 - p0))


def mixture(log_lrs: Sequence[float], weights: Sequence[float]) -> float:
    return logsumexp([lw + math.log(w) for lw, w in zip(log_lrs, weights, strict=True)])


def rate_ratio_ci(n1: int, x1: int, n2: int, x2: int, confidence: float = 0.95) -> tuple[float, float, float]:
    """v2's error rate over v1's: estimate and interval from Clopper-Pearson on v2's share of the
    errors (exact given the total; uses the counts of the whole period)."""
    x = x1 + x2
    if n1 <= 0 or n2 <= 0 or x == 0:
        return (math.nan, 0.0, math.inf)
    odds = n1 / n2

    def ratio(share: float) -> float:
        return math.inf if share >= 1 else share / (1 - share) * odds

    lo, hi = clopper_pearson(x2, x, confidence)
    return (ratio(x2 / x), ratio(lo), ratio(hi))


def error_power(
    n1: int,
    x1: int,
    n2: int,
    *,
    ratio: float,
    floor: float,
    threshold: float,
    ratios: Sequence[float],
    weights: Sequence[float],
) -> float:
    """Probability that a v2 with ``ratio`` x v1's error rate would have crossed the threshold on
    counts like these (v1's rate taken at least ``floor``, so an error-free v1 can still be judged).
    Approximates the checks by one block with the period's split."""
    if n1 <= 0 or n2 <= 0:
        return 0.0
    base = max(x1 / n1, floor)
    total = round(base * n1 + ratio * base * n2)
    if total == 0:
        return 0.0
    p0 = n2 / (n1 + n2)
    shares = [share_under(r, n1, n2) for r in ratios]

    def evidence(k: int) -> float:
        return mixture(
            [k * math.log(p / p0) + (total - k) * math.log((1 - p) / (1 - p0)) for p in shares], weights
        )

    if evidence(total) < threshold:
        return 0.0
    lo, hi = 0, total  # smallest k whose evidence reaches the threshold (evidence grows with k)
    while lo < hi:
        mid = (lo + hi) // 2
        if evidence(mid) >= threshold:
            hi = mid
        else:
            lo = mid + 1
    return binom_sf(lo, total, share_under(ratio, n1, n2))


# --- latency: one-sided mSPRT on the pooled Mann-Whitney effect ----------------------------------


def latency_increment(h1: Sequence[int], h2: Sequence[int]) -> tuple[float, float]:
    """(score, information) of one increment: (theta - 1/2) / V and 1 / V, V the null variance of
    theta. Summed over checks they pool the per-check effects by precision."""
    mw = mann_whitney(h1, h2)
    if mw.var_null <= 0:
        return (0.0, 0.0)
    scale = float(mw.n1 * mw.n2)
    var_theta = mw.var_null / (scale * scale)
    return ((mw.theta - 0.5) / var_theta, 1.0 / var_theta)


def dispersion(score: float, info: float, spread: float, checks: int) -> float:
    """How much more the per-check effects scatter than independent requests would make them (at
    least 1): Pearson's statistic over the checks, divided by its degrees of freedom.

    Latencies are not independent: a pause of one v2 process delays every request it holds at once,
    which the Mann-Whitney variance assumes away, so one stalled second would look like a strong
    effect. Dividing score and information by this factor (quasi-likelihood) judges the evidence
    by how consistently v2 is slower from check to check, not by how many requests one stall hit.
    """
    if checks < 2 or info <= 0:
        return 1.0
    return max(1.0, (spread - score * score / info) / (checks - 1))


def latency_log_lr(score: float, info: float, tau: float) -> float:
    """log of the half-normal(tau) mixture over "theta above 1/2" of the Gaussian likelihood ratios."""
    if info <= 0:
        return 0.0
    spread = 1.0 + tau * tau * info
    return (
        math.log(2.0)
        - 0.5 * math.log(spread)
        + score * score * tau * tau / (2 * spread)
        + log_normal_cdf(score * tau / math.sqrt(spread))
    )


def latency_power(info: float, effect: float, tau: float, threshold: float) -> float:
    """Probability that a true theta of 1/2 + ``effect`` would have crossed the threshold with this
    much information (the score is then Normal(effect x info, info))."""
    if info <= 0 or effect <= 0:
        return 0.0
    lo, hi = -10 * math.sqrt(info), 10 * math.sqrt(info) + 1.0
    while latency_log_lr(hi, info, tau) < threshold:
        hi *= 2
    for _ in range(100):  # the evidence grows with the score: the score that just reaches it
        mid = (lo + hi) / 2
        if latency_log_lr(mid, info, tau) >= threshold:
            hi = mid
        else:
            lo = mid
    return 1.0 - _NORMAL.cdf((hi - effect * info) / math.sqrt(info))
