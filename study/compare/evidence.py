"""How far a comparison of cells is decided by its seeds: spreads of log10 MSE, Welch intervals
between two cells, the ranking of many, and how many seeds would settle an undecided gap.

Why log10: MSEs of one cell across seeds spread over orders of magnitude (a seed that finds the
curve's shape and one that does not), so their mean and standard deviation on a linear scale are
dominated by the worst seed; on a log scale a ratio of MSEs is a difference, which is what a
reader compares ("deep is 0.7x shallow"). Welch's interval does not assume equal spreads.
"""

from __future__ import annotations

import math
import statistics
from dataclasses import dataclass

from scipy import stats as sps

LEVEL = 0.95  # two-sided confidence of every interval and verdict
POWER = 0.8  # of the seed count suggested for an undecided gap


@dataclass(frozen=True)
class Spread:
    """Mean and standard deviation of log10 of one cell's values over its seeds."""

    mean: float
    sd: float
    n: int

    @classmethod
    def of(cls, values: tuple[float, ...] | list[float]) -> Spread:
        logs = [math.log10(v) for v in values if math.isfinite(v) and v > 0]
        if not logs:
            return cls(math.nan, math.nan, 0)
        sd = statistics.stdev(logs) if len(logs) > 1 else 0.0
        return cls(statistics.fmean(logs), sd, len(logs))

    def interval(self, level: float = LEVEL) -> tuple[float, float]:
        """The mean's confidence interval (Student's t); unbounded below two seeds."""
        if self.n < 2:
            return -math.inf, math.inf
        half = sps.t.ppf((1 + level) / 2, self.n - 1) * self.sd / math.sqrt(self.n)
        return self.mean - half, self.mean + half


@dataclass(frozen=True)
class Gap:
    """a - b in log10 (a's values are 10**diff times b's), its Welch interval and p-value."""

    diff: float
    low: float
    high: float
    p: float
    n_a: int
    n_b: int

    @property
    def decided(self) -> bool:
        """The interval excludes 0: at LEVEL, one cell is lower than the other."""
        return self.low > 0 or self.high < 0

    def ratio(self) -> str:
        """'0.71x (95% CI 0.31x-1.6x)': a's values as a multiple of b's."""
        lo = "0" if self.low == -math.inf else f"{10**self.low:.2g}x"
        hi = "inf" if self.high == math.inf else f"{10**self.high:.2g}x"
        return f"{10**self.diff:.2g}x ({LEVEL:.0%} CI {lo}-{hi})"


def welch(a: Spread, b: Spread, level: float = LEVEL) -> Gap:
    diff = a.mean - b.mean
    if a.n < 2 or b.n < 2:  # no spread to test against
        return Gap(diff, -math.inf, math.inf, 1.0, a.n, b.n)
    va, vb = a.sd**2 / a.n, b.sd**2 / b.n
    se = math.sqrt(va + vb)
    if se == 0:  # every seed alike in both cells: the difference is exact
        return Gap(diff, diff, diff, 0.0 if diff else 1.0, a.n, b.n)
    df = (va + vb) ** 2 / (va**2 / (a.n - 1) + vb**2 / (b.n - 1))
    half = sps.t.ppf((1 + level) / 2, df) * se
    p = 2 * sps.t.sf(abs(diff) / se, df)
    return Gap(diff, diff - half, diff + half, float(p), a.n, b.n)


def seeds_to_settle(
    a: Spread, b: Spread, level: float = LEVEL, power: float = POWER
) -> int | None:
    """Seeds per cell that would decide a gap of the observed size at the observed spread
    (normal approximation), more than each has now; None where no number would (no gap)."""
    sd = math.sqrt((a.sd**2 + b.sd**2) / 2)
    diff = abs(a.mean - b.mean)
    if not diff or not math.isfinite(diff) or not math.isfinite(sd):
        return None
    z = sps.norm.ppf((1 + level) / 2) + sps.norm.ppf(power)
    return max(math.ceil(2 * (z * sd / diff) ** 2), max(a.n, b.n) + 1)


@dataclass(frozen=True)
class Place:
    """One cell in a ranking: its place (1 = lowest mean log10), its spread, its gap to the best
    cell and whether that gap is undecided (the cell is indistinguishable from the best)."""

    cell: str
    place: int
    spread: Spread
    to_best: Gap | None  # None for the best itself
    tied_with_best: bool


def rank(spreads: dict[str, Spread], level: float = LEVEL) -> list[Place]:
    """Cells by mean log10 value, lowest first; cells without values last, unranked."""
    have = sorted((c for c, s in spreads.items() if s.n), key=lambda c: spreads[c].mean)
    out = []
    for i, cell in enumerate(have):
        gap = None if i == 0 else welch(spreads[cell], spreads[have[0]], level)
        out.append(Place(cell, i + 1, spreads[cell], gap, gap is None or not gap.decided))
    return out
