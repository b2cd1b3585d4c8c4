"""Drawing: plotly figures from a study and from analysis data, and writing them to files.

Optuna's own visualization functions draw everything they can; only the fit of the best network
against sin(x) is drawn here, from `analysis.Fit`. MSE axes are logarithmic: values span decades.
"""

from __future__ import annotations

import math
import shutil
from collections.abc import Callable
from pathlib import Path

import optuna
import optuna.visualization as vis
import plotly.graph_objects as go
import plotly.io as pio
from plotly.subplots import make_subplots

from study.config import ConfigError
from study.quiet import experimental
from study.views import analysis, importance
from study.views.analysis import Fit

LOG_Y = {"history", "intermediate_values"}  # figures whose y axis is the MSE itself (slices too)
SLICE_PARAMS = 4  # parameters per slice figure: one row of panels stays readable on a screen
MSE = "val MSE"


def _log10_value(t: optuna.trial.FrozenTrial) -> float:
    return math.log10(max(t.values[0], 1e-30))


def _mse(t: optuna.trial.FrozenTrial) -> float:
    return t.values[0]


def fit_figure(f: Fit, title: str = "best network vs sin(x)") -> go.Figure:
    fig = make_subplots(
        rows=2, cols=1, shared_xaxes=True, row_heights=[0.7, 0.3], vertical_spacing=0.06
    )
    fig.add_trace(
        go.Scatter(x=f.x, y=f.target, name="sin(x)", line=dict(color="black", width=3)),
        row=1,
        col=1,
    )
    fig.add_trace(
        go.Scatter(x=f.x, y=f.prediction, name="network", line=dict(color="crimson", dash="dash")),
        row=1,
        col=1,
    )
    fig.add_trace(
        go.Scatter(x=f.x, y=f.residual, name="residual", line=dict(color="steelblue")),
        row=2,
        col=1,
    )
    fig.update_layout(title=f"{title} (MSE {f.mse:.2e} on {len(f.x)} grid points)", height=600)
    fig.update_yaxes(title_text="y", row=1, col=1)
    fig.update_yaxes(title_text="network - sin(x)", row=2, col=1)
    fig.update_xaxes(title_text="x", row=2, col=1)
    return fig


def fit_png(f: Fit, path: Path, title: str) -> None:
    """The same fit as `fit_figure`, as a PNG drawn by matplotlib (Agg): quick and no browser,
    so the objective can store it with a trial while the trial still runs (finished trials
    take no new artifacts)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    # Fixed margins, not layout="constrained": the layout solver doubled the cost, and the
    # batched engine's writer draws one of these per new best.
    fig, (top, bottom) = plt.subplots(2, 1, sharex=True, figsize=(8, 5.5), height_ratios=[2.3, 1])
    fig.subplots_adjust(left=0.11, right=0.98, top=0.94, bottom=0.09, hspace=0.08)
    top.plot(f.x, f.target, color="black", lw=2.5, label="sin(x)")
    top.plot(f.x, f.prediction, color="crimson", ls="--", lw=1.5, label="network")
    top.set_ylabel("y")
    top.legend(loc="upper right")
    top.set_title(f"{title} (MSE {f.mse:.2e} on {len(f.x)} grid points)")
    bottom.plot(f.x, f.residual, color="steelblue", lw=1)
    bottom.axhline(0, color="gray", lw=0.5)
    bottom.set_xlabel("x")
    bottom.set_ylabel("network - sin(x)")
    fig.savefig(path, dpi=110)
    plt.close(fig)


def importance_figure(found: importance.Importances, evaluator: str, multi: bool) -> go.Figure:
    """One evaluator's importances for one objective as bars with their 95% intervals (the
    largest on top); parameters 0 by construction are left out and named in the title."""
    ev = next(e for e in found.evaluated if e.evaluator == evaluator)
    rows = [r for r in reversed(ev.rows) if not r.structural]  # plotly draws the last on top
    fig = go.Figure(
        go.Bar(
            x=[r.value for r in rows],
            y=[r.param for r in rows],
            orientation="h",
            error_x=dict(
                type="data",
                # a bootstrap interval need not contain the value on all trials: clipped there
                array=[max(r.high - r.value, 0.0) for r in rows],
                arrayminus=[max(r.value - r.low, 0.0) for r in rows],
            ),
            text=[f"first in {r.first:.0%}" for r in rows],
            hovertemplate="%{y}: %{x:.3f} (%{text} of resamples)<extra></extra>",
        )
    )
    of = f" for {found.objective}" if multi else ""
    fig.update_layout(
        title=f"Hyperparameter importance{of} ({importance.NAMES[evaluator]}), 95% interval "
        f"over {found.resamples} resamples of {found.trials} trials",
        xaxis_title="importance (normalised)",
        yaxis_title="parameter",
    )
    return fig


def pareto_figure(study: optuna.Study) -> go.Figure:
    """Validation MSE against parameters (both log axes), the front highlighted (Optuna draws the
    dominated complete trials too)."""
    with experimental():
        fig = vis.plot_pareto_front(study, target_names=[MSE, "parameters"])
    # both logarithmic: sizes span decades too, and a linear axis piles the small ones on zero
    fig.update_xaxes(type="log", title_text=f"{MSE} (log scale)")
    fig.update_yaxes(type="log", title_text="parameters (log scale)")
    fig.update_layout(title="Pareto front: validation MSE against network size")
    return fig


def study_figures(
    study: optuna.Study,
    *,
    evaluators: tuple[str, ...] = analysis.EVALUATORS,
    found: list[importance.Importances] | None = None,
) -> tuple[dict[str, go.Figure], list[str]]:
    """Every figure the study's data allows, by file stem; and one note per figure skipped.
    `found`: the importances of each objective (importance.evaluate), where the caller has them."""
    notes: list[str] = []
    # Values span decades (1e-7 .. 1e-1): axes that show the MSE are logarithmic; where Optuna
    # draws the value as a colour or a parallel axis, it is given log10(MSE) to draw.
    log_target = {"target": _log10_value, "target_name": f"log10 {MSE}"}
    # a study of two objectives: Optuna's plots draw one, named; its first is the MSE
    mse = {"target": _mse} if analysis.is_multi(study) else {}
    makers: dict[str, Callable[[], go.Figure]] = {
        "history": lambda: vis.plot_optimization_history(study, target_name=MSE, **mse),
        "intermediate_values": lambda: vis.plot_intermediate_values(study),
        "parallel_coordinate": lambda: vis.plot_parallel_coordinate(study, **log_target),
        "edf": lambda: _log_x(vis.plot_edf(study, target_name=MSE, **mse)),
        "timeline": lambda: vis.plot_timeline(study),
    }
    if analysis.is_multi(study) and analysis.complete_trials(study):
        makers["pareto_front"] = lambda: pareto_figure(study)
    params = sorted({p for t in analysis.complete_trials(study) for p in t.params})
    for i in range(0, len(params), SLICE_PARAMS):
        chunk = params[i : i + SLICE_PARAMS]
        name = "slice" if i == 0 else f"slice_{i // SLICE_PARAMS + 1}"
        makers[name] = lambda chunk=chunk: _log_y(
            vis.plot_slice(study, params=chunk, target_name=MSE, **mse)
        )
    for other in ("depth", "width"):
        if {"lr", other} <= set(params):
            makers[f"contour_lr_{other}"] = lambda other=other: vis.plot_contour(
                study, params=["lr", other], **log_target
            )
    shortfall = analysis.importance_shortfall(study)
    if shortfall:
        notes.append(shortfall)
    elif evaluators:
        multi = analysis.is_multi(study)
        for i, name in enumerate(analysis.objective_names(study)):
            of = found[i] if found else importance.evaluate(study, evaluators, objective=i)
            for ev in evaluators:
                stem = f"importance_{ev.replace('-', '_')}" + (f"_{name}" if i else "")
                makers[stem] = lambda ev=ev, of=of: importance_figure(of, ev, multi)
    figs = {}
    with experimental():
        for name, make in makers.items():
            fig = make()
            if name in LOG_Y:
                _log_y(fig)
            figs[name] = fig
    return figs, notes


def _log_y(fig: go.Figure) -> go.Figure:
    fig.update_yaxes(type="log")
    fig.update_layout(yaxis_title=f"{MSE} (log scale)")  # the first (or only) panel's axis
    return fig


def _log_x(fig: go.Figure) -> go.Figure:
    fig.update_xaxes(type="log")
    fig.update_layout(xaxis_title=f"{MSE} (log scale)")
    return fig


def write(figs: dict[str, go.Figure], out_dir: Path, *, png: bool) -> list[Path]:
    """HTML always (plotly.js once, beside them: offline and small); PNG too when asked."""
    out_dir.mkdir(parents=True, exist_ok=True)
    written = []
    for name, fig in figs.items():
        html = out_dir / f"{name}.html"
        fig.write_html(html, include_plotlyjs="directory")
        written.append(html)
    written.append(out_dir / "plotly.min.js")  # the pages' one copy of plotly.js
    if png:  # one call: kaleido starts the browser once for all figures
        pngs = [out_dir / f"{name}.png" for name in figs]
        pio.write_images(
            list(figs.values()),
            pngs,
            width=1000,
            height=[700 if n == "fit" else 600 for n in figs],
        )
        written += pngs
    return written


def plot_study(
    study: optuna.Study,
    out_dir: Path,
    *,
    best_fit: tuple[Fit | None, object],
    evaluators: tuple[str, ...],
    png: bool,
) -> tuple[list[Path], list[str]]:
    """`sinstudy plot`: every figure, plus `best_fit` = (the best network's fit, its trial) from
    its stored weights (artifacts.best_fit). Returns (files, notes)."""
    if not study.get_trials(
        deepcopy=False, states=(optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.PRUNED)
    ):
        raise ConfigError(
            f"study {study.study_name!r} has no finished trial to plot; run `sinstudy run` first"
        )
    figs, notes = study_figures(study, evaluators=evaluators)
    fit, trial = best_fit
    if fit is not None:
        figs["fit"] = fit_figure(fit, title=f"best trial #{trial.number} vs sin(x)")
    else:
        notes.append("best fit skipped: no complete trial with stored weights")
    if png:
        missing = png_available()
        if missing:
            notes.append(missing)
            png = False
    return write(figs, out_dir, png=png), notes


def png_available() -> str | None:
    """None when PNG export works here; else one line saying what is missing."""
    try:
        import kaleido  # noqa: F401
    except ImportError:
        return "PNG skipped: kaleido is not installed (pip install kaleido)"
    if not any(
        shutil.which(b) for b in ("chromium", "chromium-browser", "google-chrome", "chrome")
    ):
        return "PNG skipped: no Chromium/Chrome found (Debian: apt-get install chromium)"
    return None
