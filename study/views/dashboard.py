"""What optuna-dashboard shows beyond Optuna's own data, and serving it.

`publish(study)` runs at the end of `sinstudy run`: a markdown note summarising the study, which
the dashboard renders on the study page. (Each trial that is best when it finishes stores its
weights and a fit image as artifacts from the objective, so they show on its trial page.)
`bind()` is `sinstudy dashboard`: optuna-dashboard on the same storage and artifact store.
"""

from __future__ import annotations

from pathlib import Path

import optuna
from optuna.artifacts import FileSystemArtifactStore

from study.trial.course import BEST_TEST_MSE as REPORT_BEST_TEST_MSE
from study.views import analysis, importance, results


def study_note(study: optuna.Study, resamples: int | None = None) -> str:
    """The note: counts, the best trial, a front's tables, and each objective's importances.
    Every run waits for its note, so by default they come with intervals over
    importance.NOTE_RESAMPLES resamples up to NOTE_MAX_TRIALS complete trials, and as values
    alone beyond (the note then names `sinstudy importance`)."""
    c = analysis.Counts.of(study.get_trials(deepcopy=False))
    lines = [
        f"## {study.study_name}",
        f"{c.complete} complete, {c.pruned} pruned, {c.failed} failed trials.",
    ]
    top = analysis.top_trials(study, 1)
    if top:
        b = top[0]
        lines += [
            "",
            f"**Best trial #{b.number}**{analysis.repeats_text(b)}: validation MSE "
            f"{analysis.mse_texts(b)[0]}, "
            f"test MSE {analysis.mse_texts(b)[1]} (course report's best: "
            f"{REPORT_BEST_TEST_MSE:.3e}).",
            "",
            f"Params: `{analysis.params_text(b.params)}`. Its weights and fit plot are artifacts "
            f"on its trial page.",
        ]
    front = analysis.front(study)
    if front:
        lines += [
            "",
            f"**Pareto front** ({len(front)} trials, fewest parameters first):",
            "",
            "| trial | parameters | val MSE | test MSE | params |",
            "|---|---|---|---|---|",
        ]
        lines += [f"| {' | '.join(r)} |" for r in analysis.front_rows(front)]
        lines += [
            "",
            "| smallest network with test MSE <= | trial | parameters |",
            "|---|---|---|",
        ]
        for level, t in analysis.smallest_reaching(study):
            cells = f"#{t.number} | {t.user_attrs['n_params']}" if t else "none yet | "
            lines.append(f"| {level:.0e} | {cells} |")
    if resamples is None:
        small = len(analysis.complete_trials(study)) <= importance.NOTE_MAX_TRIALS
        resamples = importance.NOTE_RESAMPLES if small else 0
    if not analysis.importance_shortfall(study):
        for i, name in enumerate(analysis.objective_names(study)):
            found = importance.evaluate(study, objective=i, resamples=resamples)
            said = importance.lines(found)
            title = f"importance for {name}" if front else "parameter"
            names = [importance.NAMES[e.evaluator] for e in found.evaluated]
            lines += ["", f"| {title} | {' | '.join(names)} |", "|---|---|---|"]
            lines += [
                f"| {p} | {' | '.join(e.of(p).text(bool(resamples)) for e in found.evaluated)} |"
                for p in found.params
            ]
            # what the numbers mean: resamples, ranking, agreement, stability
            lines += ["", said[0], *(f"- {x}" for x in said[2 + len(found.params) :])]
        if evidence := importance.evidence_line(study):
            lines.append(f"- {evidence}")
    return "\n".join(lines)


def publish(study: optuna.Study) -> None:
    """Write (or update) the study note the dashboard shows on the study page."""
    from optuna_dashboard import save_note

    save_note(study, study_note(study))


def bind(url: str, *, host: str, port: int, artifact_dir: str):
    """optuna-dashboard's app on the storage and artifact store, bound to host:port (so a port
    in use is one clear error before anything is printed). Call .serve_forever() on it."""
    from wsgiref.simple_server import WSGIRequestHandler, make_server

    from optuna_dashboard import wsgi

    class Quiet(WSGIRequestHandler):
        def log_message(self, *args) -> None:  # no access log line per request
            pass

    from study.errors import StorageError

    storage = results.open_for_reading(url, read_only=False)  # its users may fail or note trials
    Path(artifact_dir).mkdir(parents=True, exist_ok=True)
    app = wsgi(storage, artifact_store=FileSystemArtifactStore(artifact_dir))
    try:
        return make_server(host, port, app, handler_class=Quiet)
    except OSError as e:
        raise StorageError(
            f"cannot serve on {host}:{port} ({e.strerror or e}); choose another --port or --host",
            exit_code=1,
        ) from None
