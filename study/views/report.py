"""`sinstudy report`: one self-contained HTML file (plotly.js inlined once: readable offline)."""

from __future__ import annotations

import html
import json
from datetime import datetime

import optuna
import plotly.graph_objects as go

from study.config import ConfigError
from study.trial.course import BEST_TEST_MSE as REPORT_BEST_TEST_MSE
from study.views import analysis, importance, plots
from study.views.artifacts import best_fit

KEY_PLOTS = (
    "pareto_front",
    "history",
    "importance_ped_anova",
    "importance_fanova",
    "parallel_coordinate",
    "intermediate_values",
    "contour_lr_depth",
)

_STYLE = """
body{font-family:system-ui,sans-serif;max-width:1100px;margin:2em auto;padding:0 1em;color:#222}
table{border-collapse:collapse;margin:1em 0}td,th{border:1px solid #ccc;padding:4px
10px;text-align:right}
th{background:#f3f3f3}td.l,th.l{text-align:left}h2{margin-top:2em;border-bottom:1px solid #ddd}
.note{color:#555}
"""


def _compute_text(attrs: dict) -> str:
    """Its share of the device's time (the batched engine trains trials together; its
    seconds run from its start to its end, beside the others)."""
    compute = attrs.get("compute_seconds")
    return "" if compute is None else f"{compute:.1f}"


def _table(head: list[str] | None, rows: list[list[str]], left: int = 1) -> str:
    """An HTML table; `head` None: no header row (a key-value table)."""

    def cells(tag: str, values: list[str]) -> str:
        return "".join(
            f"<{tag}{' class=l' if i < left else ''}>{html.escape(v)}</{tag}>"
            for i, v in enumerate(values)
        )

    body = "".join(f"<tr>{cells('td', r)}</tr>" for r in rows)
    top = f"<tr>{cells('th', head)}</tr>" if head else ""
    return f"<table>{top}{body}</table>"


def _front_parts(study: optuna.Study, front: list) -> list[str]:
    """A study of two objectives: its Pareto front, and the smallest network reaching each
    test MSE level."""
    rows = []
    for level, t in analysis.smallest_reaching(study):
        if t is None:
            rows.append([f"{level:.0e}", "none yet", "", "", ""])
        else:
            rows.append(
                [
                    f"{level:.0e}",
                    f"#{t.number}",
                    str(t.user_attrs["n_params"]),
                    analysis.mse_texts(t)[1],
                    analysis.params_text(t.params),
                ]
            )
    return [
        f"<h2>Pareto front ({len(front)} trials)</h2>",
        "<p class=note>Complete trials no other trial beats on both validation MSE and size, "
        "fewest parameters first.</p>",
        _table(
            ["trial", "parameters", "val MSE", "test MSE", "params"],
            analysis.front_rows(front),
        ),
        "<h2>Smallest network reaching a test MSE</h2>",
        _table(["test MSE <=", "trial", "parameters", "its test MSE", "params"], rows),
    ]


def build(study: optuna.Study, artifact_dir: str) -> str:
    c = analysis.Counts.of(study.get_trials(deepcopy=False))
    top = analysis.top_trials(study, 10)
    if not top:
        raise ConfigError(f"study {study.study_name!r} has no complete trial yet; run more trials")
    best = top[0]
    front = analysis.front(study)
    cfg = json.loads(study.user_attrs.get("config", "{}"))
    parts = [
        f"<h1>sinstudy report: {html.escape(study.study_name)}</h1>",
        f"<p class=note>Generated {datetime.now():%Y-%m-%d %H:%M} from the study storage (no "
        f"retraining).</p>",
        "<h2>Summary</h2>",
        _table(
            None,
            [
                ["trials", f"{c.complete} complete, {c.pruned} pruned, {c.failed} failed"],
                [
                    "most accurate trial" if front else "best trial",
                    f"#{best.number}: {analysis.params_text(best.params)}",
                ],
                ["best validation MSE", analysis.mse_texts(best)[0] + analysis.repeats_text(best)],
                [
                    "its test MSE",
                    f"{analysis.mse_texts(best)[1]} (course report's best: "
                    f"{REPORT_BEST_TEST_MSE:.3e})",
                ],
                ["parameters", str(best.user_attrs.get("n_params", "?"))],
                ["epochs per trial", str(cfg.get("train", {}).get("max_epochs", "?"))],
                ["sampler / pruner", f"{cfg.get('sampler', '?')} / {cfg.get('pruner', '?')}"],
            ],
        ),
    ]
    if front:
        parts += _front_parts(study, front)
    found = (
        None
        if analysis.importance_shortfall(study)
        else [
            importance.evaluate(study, objective=i)
            for i in range(len(analysis.objective_names(study)))
        ]
    )
    parts += _importance_parts(study, found)
    parts += _top_parts(top)
    parts += _plot_parts(study, artifact_dir, found)
    return (
        f"<!DOCTYPE html><html><head><meta charset=utf-8><title>sinstudy: "
        f"{html.escape(study.study_name)}</title><style>{_STYLE}</style></head><body>{''.join(parts)}</body></html>"
    )


def _importance_parts(study: optuna.Study, found: list | None) -> list[str]:
    parts = ["<h2>Hyperparameter importance</h2>"]
    if found is None:
        return parts + [f"<p class=note>{html.escape(analysis.importance_shortfall(study))}</p>"]
    for f in found:
        said = importance.lines(f)
        parts.append(f"<p>{html.escape(said[0])}</p>")
        header = ["parameter", *(importance.NAMES[e.evaluator] for e in f.evaluated)]
        rows = [[p, *(e.of(p).text() for e in f.evaluated)] for p in f.params]
        parts.append(_table(header, rows))
        parts += [f"<p class=note>{html.escape(line)}</p>" for line in said[2 + len(rows) :]]
    if evidence := importance.evidence_line(study):
        parts.append(f"<p class=note>{html.escape(evidence)}</p>")
    return parts


def _top_parts(top: list) -> list[str]:
    return [
        "<h2>Top 10 trials</h2>",
        _table(
            ["trial", "params", "val MSE", "test MSE", "best epoch", "seconds", "compute s"],
            [
                [
                    f"#{t.number}",
                    analysis.params_text(t.params),
                    *analysis.mse_texts(t),
                    str(t.user_attrs.get("best_epoch", "")),
                    f"{t.user_attrs.get('seconds', 0):.1f}",
                    _compute_text(t.user_attrs),
                ]
                for t in top
            ],
            left=2,
        ),
    ]


def _plot_parts(study: optuna.Study, artifact_dir: str, found: list | None) -> list[str]:
    parts = ["<h2>Plots</h2>"]
    figs, _ = plots.study_figures(study, found=found)
    chosen: list[go.Figure] = [figs[k] for k in KEY_PLOTS if k in figs]
    fit, trial = best_fit(study, artifact_dir)
    if fit is not None:
        chosen.insert(0, plots.fit_figure(fit, title=f"best trial #{trial.number} vs sin(x)"))
    for i, fig in enumerate(chosen):
        parts.append(fig.to_html(full_html=False, include_plotlyjs=(i == 0)))
    return parts
