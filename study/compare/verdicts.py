"""What a comparison says: each cell's statistics (CellStats), and one judge per factor's
hypothesis (JUDGES) whose verdicts state their test and uncertainty (study.compare.evidence):
"clearly" only where the interval decides it, else the seeds that would settle it."""

from __future__ import annotations

import math
import statistics
from dataclasses import dataclass, replace

from study import config
from study.compare import evidence
from study.compare.evidence import LEVEL, Gap, Spread
from study.compare.factors import HYPOTHESES, NETS
from study.trial import course
from study.trial.course import TEST_MSE as REPORT_TEST_MSE

SETTLE_WITHIN = 2.0  # "settled": the mean validation curve stays within this factor of its best
LEARNED = 10.0  # ... and its best is this many times below its first epoch's (it learned)


@dataclass(frozen=True)
class CellStats:
    """One cell's values, one per seed (its trial's `*_per_seed` attrs)."""

    cell: str
    test: tuple[float, ...]  # test MSE on the best epoch's weights
    final_test: tuple[float, ...]  # on the last epoch's weights
    val: tuple[float, ...]  # best validation MSE
    final_val: tuple[float, ...]
    report: str
    settled: int | None = None  # settled(): None = never (or no curve: n == 0)
    note: str = ""  # what the reader must know to read the row (a schedule that never acts)

    @property
    def n(self) -> int:
        return len(self.test)


def settled(curve: dict[int, float]) -> int | None:
    """The epoch from which the (mean) validation curve stays within SETTLE_WITHIN of its best:
    where a loss plot on a log scale stops visibly falling, what the report calls converged.
    None (never) where it ends above that, or where its best is not LEARNED times below its first
    epoch's value (a curve that never fell has not converged, it has not learned)."""
    finite = sorted((e, v) for e, v in curve.items() if math.isfinite(v))
    if not finite:
        return None
    best = min(v for _, v in finite)
    if best * LEARNED > finite[0][1] or finite[-1][1] > SETTLE_WITHIN * best:
        return None
    out = finite[-1][0]
    for e, v in reversed(finite):
        if v > SETTLE_WITHIN * best:
            break
        out = e
    return out


def _mean_std(values: tuple[float, ...] | list[float]) -> tuple[float, float]:
    if not values:
        return math.nan, math.nan
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


HELD, FAILED, UNDECIDED = "held", "did not hold", "undecided"


@dataclass(frozen=True)
class Verdict:
    claim: str  # what is tested, in a few words: the summary names it
    outcome: str  # HELD, FAILED or UNDECIDED, at evidence.LEVEL
    text: str  # the comparison made, its numbers and their uncertainty


def _how(gap: Gap) -> str:
    return f"Welch on log10 MSE, {gap.n_a} and {gap.n_b} seeds"


def _hint(a: Spread, b: Spread, cmd: str) -> str:
    n = evidence.seeds_to_settle(a, b)
    if n is None:
        return "no number of seeds would settle it: the two do not differ"
    if n > config.MAX_REPEATS:
        return (
            f"more than {config.MAX_REPEATS} seeds per cell (the most --seeds takes) would be "
            "needed for a gap this small at this spread"
        )
    return f"about {n} seeds per cell would settle a gap this size: {cmd} --seeds {n}"


def _direction(
    a: str, a_vals, b: str, b_vals, what: str, cmd: str
) -> tuple[Gap, str, Spread, Spread]:
    """a's values against b's: the gap and one sentence with its ratio, interval and test."""
    sa, sb = Spread.of(a_vals), Spread.of(b_vals)
    gap = evidence.welch(sa, sb)
    text = f"{a}'s {what} is {gap.ratio()} {b}'s ({_how(gap)})"
    if gap.decided:
        text += f": clearly {'lower' if gap.diff < 0 else 'higher'}"
    else:
        text += f": undecided at this many seeds; {_hint(sa, sb, cmd)}"
    return gap, text, sa, sb


def _claim_lower(claim: str, a: str, a_vals, b: str, b_vals, what: str, cmd: str) -> Verdict:
    """Verdict on "a's `what` is lower than b's"."""
    gap, text, _, _ = _direction(a, a_vals, b, b_vals, what, cmd)
    outcome = UNDECIDED if not gap.decided else HELD if gap.diff < 0 else FAILED
    return Verdict(claim, outcome, text)


def _both(claim: str, text: str, gaps: list[tuple[Gap, bool]]) -> Verdict:
    """Held where every gap is decided the claimed way (True: a lower); failed where one is
    decided against it."""
    if any(g.decided and (g.diff < 0) != lower for g, lower in gaps):
        return Verdict(claim, FAILED, text)
    if all(g.decided for g, _ in gaps):
        return Verdict(claim, HELD, text)
    return Verdict(claim, UNDECIDED, text)


def _geo(s: Spread) -> str:
    return f"{10**s.mean:.2e}" if s.n else "no values"


def _within(s: Spread, target: float, factor: float) -> str:
    """HELD where the geometric mean's interval lies within `factor` of target, FAILED where it
    lies wholly outside, UNDECIDED otherwise."""
    lo, hi = s.interval()
    t, f = math.log10(target), math.log10(factor)
    if t - f <= lo and hi <= t + f:
        return HELD
    if hi < t - f or lo > t + f:
        return FAILED
    return UNDECIDED


def _side(s: Spread, bound: float, *, below: bool) -> str:
    """HELD where the geometric mean's interval lies wholly below (above) `bound`, FAILED where
    wholly on the other side, UNDECIDED where it straddles it."""
    lo, hi = s.interval()
    b = math.log10(bound)
    if (hi < b) if below else (lo > b):
        return HELD
    if (lo > b) if below else (hi < b):
        return FAILED
    return UNDECIDED


def _ratio_interval(s: Spread, target: float) -> str:
    lo, hi = s.interval()
    t = math.log10(target)
    low = "0" if lo == -math.inf else f"{10 ** (lo - t):.2g}x"
    high = "inf" if hi == math.inf else f"{10 ** (hi - t):.2g}x"
    return f"{10 ** (s.mean - t):.2g}x the report's, {LEVEL:.0%} CI {low}-{high}"


def command(name: str, epochs: int, setup: str = "default") -> str:
    return f"sinstudy compare {name} --max-epochs {epochs}" + (
        "" if setup == "default" else f" --setup {setup}"
    )


def verdicts(
    name: str, rows: list[CellStats], *, epochs: int, setup: str = "default"
) -> list[Verdict]:
    """What the comparison says about its question, each verdict with its test and uncertainty
    (at evidence.LEVEL): "clearly" only where the interval excludes no difference. Each
    factor's hypothesis is judged by its rule in JUDGES."""
    return JUDGES[name]({row.cell: row for row in rows}, command(name, epochs, setup))


def _judge_depth(r: dict[str, CellStats], cmd: str) -> list[Verdict]:
    s, d = r["shallow (1 layer)"], r["deep (4 layers)"]
    v = _claim_lower(
        "deep fits better than shallow", "deep", d.test, "shallow", s.test, "test MSE", cmd
    )
    report = (
        f"report: deep better ({REPORT_TEST_MSE['deep']:.1e} vs {REPORT_TEST_MSE['shallow']:.1e})"
    )
    return [replace(v, text=f"deep vs shallow, the report's pair: {v.text} ({report})")]


def _judge_width(r: dict[str, CellStats], cmd: str) -> list[Verdict]:
    n, w = r["narrow (8)"], r["wide (128)"]
    return [
        _claim_lower(
            "wide fits better than narrow", "wide", w.test, "narrow", n.test, "test MSE", cmd
        )
    ]


def _judge_lr(r: dict[str, CellStats], cmd: str) -> list[Verdict]:
    lo, hi = r["lr 1e-4"], r["lr 1e-2"]

    def rise(c: CellStats) -> list[float]:  # final / best validation MSE, per seed
        return [f / b for f, b in zip(c.final_val, c.val, strict=True) if b > 0]

    gap, text, sh, sl = _direction(
        "lr 1e-2", rise(hi), "lr 1e-4", rise(lo), "rise at the end (final / best val MSE)", cmd
    )
    first = _both(
        "lr 1e-2 ends above its best more than lr 1e-4 (the report's rise)",
        f"lr 1e-2 ends at {10**sh.mean:.2g}x its best validation MSE, lr 1e-4 at "
        f"{10**sl.mean:.2g}x (geometric means): {text} (report: 1e-2 rose again)",
        [(gap, False)],
    )
    second = _claim_lower(
        "lr 1e-4 ends with a lower test MSE than lr 1e-2",
        "lr 1e-4",
        lo.final_test,
        "lr 1e-2",
        hi.final_test,
        "test MSE on its final weights",
        cmd,
    )
    return [first, second]


def _judge_scheduler(r: dict[str, CellStats], cmd: str) -> list[Verdict]:
    none = r["no schedule"]
    out = []
    for cell in ("step schedule", "cosine schedule"):
        c = r[cell]
        g_test, t_test, _, _ = _direction(
            cell, c.final_test, "no schedule", none.final_test, "final test MSE", cmd
        )
        g_val, t_val, _, _ = _direction(
            cell, c.final_val, "no schedule", none.final_val, "final val MSE", cmd
        )
        note = f" ({c.note})" if c.note else ""
        out.append(
            _both(
                f"{cell}: worse on test, better on validation",
                f"{cell} vs none, final weights{note}: {t_test}; {t_val} (report: a schedule "
                "was worse on test and better on validation)",
                [(g_test, False), (g_val, True)],
            )
        )
    return out


_REPRODUCES = {
    HELD: "reproduces",
    FAILED: "does not reproduce",
    UNDECIDED: "undecided whether it reproduces",
}


def _judge_report(r: dict[str, CellStats], cmd: str) -> list[Verdict]:
    out = []
    for h in HYPOTHESES:
        got = {net: Spread.of(r[f"{h} / {net}"].test) for net in NETS}
        outcomes = [_within(got[net], REPORT_TEST_MSE[net], 2.0) for net in NETS]
        outcome = FAILED if FAILED in outcomes else UNDECIDED if UNDECIDED in outcomes else HELD
        when = " / ".join(
            "never" if r[f"{h} / {net}"].settled is None else str(r[f"{h} / {net}"].settled)
            for net in ("deep", "shallow")
        )
        notes = {r[f"{h} / {net}"].note for net in NETS} - {""}
        vs = {net: _ratio_interval(got[net], REPORT_TEST_MSE[net]) for net in NETS}
        out.append(
            Verdict(
                h,
                outcome,
                f"{h}: deep {_geo(got['deep'])} ({vs['deep']}), shallow "
                f"{_geo(got['shallow'])} ({vs['shallow']}), settled (deep / shallow) "
                f"{when} -> {_REPRODUCES[outcome]} the report within 2x"
                + (f" ({'; '.join(sorted(notes))})" if notes else ""),
            )
        )
    return out


def _judge_activation(r: dict[str, CellStats], cmd: str) -> list[Verdict]:
    act, lin = Spread.of(r["relu"].test), Spread.of(r["none (identity)"].test)
    fits, flat = _side(act, 1e-2, below=True), _side(lin, 0.1, below=False)
    outcome = HELD if fits == flat == HELD else FAILED if FAILED in (fits, flat) else UNDECIDED
    return [
        Verdict(
            "only with an activation does the network fit sin(x)",
            outcome,
            f"relu test MSE {_geo(act)}, no activation {_geo(lin)} (geometric means over "
            f"{act.n} and {lin.n} seeds; held where relu's {LEVEL:.0%} interval lies below 1e-2 "
            "and the identity's above 0.1) (report: only with the activation did it converge)",
        )
    ]


# each factor's hypothesis, judged from its cells' statistics (by cell name) and the command
# that reruns it (named in a verdict that needs more seeds)
JUDGES = {
    "depth": _judge_depth,
    "width": _judge_width,
    "lr": _judge_lr,
    "scheduler": _judge_scheduler,
    "report": _judge_report,
    "activation": _judge_activation,
}


def summary(found: list[Verdict], seeds: int, epochs: int = course.EPOCHS) -> str:
    """One line: which claims held, which did not, which are undecided at this many seeds; and,
    where they differ, the epochs behind them against the report's."""
    parts = []
    for outcome in (HELD, FAILED, UNDECIDED):
        claims = [v.claim for v in found if v.outcome == outcome]
        if not claims:
            continue
        many = len(claims) > 4 and outcome == FAILED
        named = f"{len(claims)} claims (listed above)" if many else "; ".join(claims)
        parts.append(f"{outcome}: {named}")
    at = f", {epochs} epochs (the report trained {course.EPOCHS:,})"
    at = "" if epochs == course.EPOCHS else at
    return f"Summary ({seeds} seeds per cell, {LEVEL:.0%} level{at}): " + ". ".join(parts) + "."
