"""Thin command line: parse, call the library, print, exit. 0 ok, 2 bad input, 1 other failure.

Each command imports what it needs inside its function: `--help` and a bad flag then answer
at once instead of after loading torch and Optuna (seconds)."""

from __future__ import annotations

import argparse
import ctypes
import dataclasses
import os
import shlex
import signal
import sys
from collections.abc import Sequence
from typing import NoReturn

from study import __version__
from study import config as config_mod
from study.config import ConfigError, StudyConfig
from study.errors import StorageError
from study.run import interrupt
from study.run.interrupt import Interrupted

DEFAULTS = StudyConfig()


class _Parser(argparse.ArgumentParser):
    """Errors in one line naming the help of the command they concern, exit 2 (argparse's own
    usage dump is noise)."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"sinstudy: error: {message} (see {self.prog} --help)\n")

    def parse_args(self, args=None, namespace=None):  # type: ignore[override]
        # argparse reports a subcommand's unknown flags from the top parser: name the subcommand
        parsed, extras = self.parse_known_args(args, namespace)
        if extras:
            where = " ".join(filter(None, (self.prog, getattr(parsed, "command", None))))
            unknown = " ".join(extras)
            self.exit(
                2, f"sinstudy: error: unrecognized arguments: {unknown} (see {where} --help)\n"
            )
        return parsed


def _study_args(p: argparse.ArgumentParser, *, reader: bool = False) -> None:
    made = "it must exist" if reader else "an existing one is continued"
    p.add_argument("--study", help=f"study name (default {DEFAULTS.study!r}); {made}")
    p.add_argument("--storage", help=f"Optuna storage URL (default {DEFAULTS.storage})")


# `sinstudy run`'s flags beyond --study/--storage: config fields (train.* for TrainConfig's),
# each generated from its field: its type, its docstring as the help, its default
RUN_FLAGS = (
    "n_trials",
    "timeout",
    "train.max_epochs",
    "objectives",
    "sampler",
    "pruner",
    "seed",
    "device",
    "engine",
    "repeats",
    "slots",
    "stacks",
    "workers",
    "devices",
)


def _config_flag(p: argparse.ArgumentParser, name: str) -> None:
    """--NAME from config field `name`: its type, its docstring (one line) and its default."""
    section, _, key = name.rpartition(".")
    cls = config_mod.TrainConfig if section == "train" else config_mod.StudyConfig
    default = getattr(DEFAULTS.train if section == "train" else DEFAULTS, key)
    kind = {"int": int, "int | None": int, "float | None": float, "float": float}
    convert = _id_list if key == "devices" else kind.get(_field_type(cls, key), str)
    shown = ",".join(map(str, default)) if isinstance(default, tuple) else default
    doc = " ".join(config_mod.field_docs(cls)[key].split())
    more = f" (default {shown})" if default is not None else ""
    p.add_argument("--" + key.replace("_", "-"), type=convert, help=doc + more)


def _field_type(cls: type, key: str) -> str:
    return next(f.type for f in dataclasses.fields(cls) if f.name == key)


def _id_list(text: str) -> tuple[int, ...]:
    try:
        ids = tuple(int(x) for x in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"--devices takes GPU ids like 0,1 (got {text!r})"
        ) from None
    return ids


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="sinstudy", description="Optuna studies of an MLP that learns sin(x) on [0, 2*pi)."
    )
    parser.add_argument("--version", action="version", version=f"sinstudy {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)
    _add_run(sub)
    _add_readers(sub)
    _add_compare(sub)
    _add_dashboard(sub)
    return parser


def _add_run(sub) -> None:
    run = sub.add_parser(
        "run", help="run (or continue) a study", description="Run trials and print a summary."
    )
    run.add_argument(
        "--config", help="TOML file with [study], [data], [train], [search_space] tables"
    )
    _study_args(run)
    for name in RUN_FLAGS:
        _config_flag(run, name)
    run.add_argument("--no-progress", action="store_true", help="no progress bar")


def _add_readers(sub) -> None:
    """The commands that read a study from storage alone."""
    best = sub.add_parser("best", help="print the best trial, from storage alone")
    _study_args(best, reader=True)

    plot = sub.add_parser("plot", help="write plotly HTML (and PNG) plots of a study")
    _study_args(plot, reader=True)
    plot.add_argument("--out", help="folder (default storage/plots/<study>/)")
    _evaluator_arg(plot)
    plot.add_argument(
        "--no-png", action="store_true", help="HTML only, even where Chromium is available"
    )
    _artifact_arg(plot)

    imp = sub.add_parser(
        "importance",
        help="parameter importances with 95%% intervals, rank stability and the evaluators' "
        "agreement",
    )
    _study_args(imp, reader=True)
    _evaluator_arg(imp)
    imp.add_argument(
        "--resamples",
        type=int,
        default=None,
        help="bootstrap resamples of the complete trials (default 20; more: steadier interval "
        "ends, proportionally slower)",
    )
    imp.add_argument(
        "--json", action="store_true", help="JSON for scripts: a list, one object per objective"
    )

    report = sub.add_parser("report", help="write one self-contained HTML report of a study")
    _study_args(report, reader=True)
    report.add_argument("--out", help="file (default storage/reports/<study>.html)")
    _artifact_arg(report)


def _add_compare(sub) -> None:
    comp = sub.add_parser(
        "compare", help="redo one of the course report's comparisons, with repeats"
    )
    comp.add_argument(
        "factor",
        help="depth, width, lr, scheduler, activation, or report (which setting gives the "
        "report's numbers)",
    )
    comp.add_argument(
        "--max-epochs",
        type=int,
        default=1000,
        help="epochs per run (default 1000, as in the report)",
    )
    comp.add_argument(
        "--seeds", type=int, default=3, help="seeds per cell, trained side by side (default 3)"
    )
    comp.add_argument(
        "--setup",
        default="default",
        help="what is held fixed: default (sinstudy's data and Adam) or report "
        "(the course report's setting: raw x, 4,800 points, plain SGD)",
    )
    comp.add_argument("--storage", help=f"Optuna storage URL (default {DEFAULTS.storage})")
    comp.add_argument("--device", default="auto", help="auto (default), cpu, cuda or cuda:N")
    comp.add_argument("--no-progress", action="store_true", help="no progress bar")


def _add_dashboard(sub) -> None:
    dash = sub.add_parser(
        "dashboard", help="serve optuna-dashboard on the study storage and artifacts"
    )
    dash.add_argument("--storage", help=f"Optuna storage URL (default {DEFAULTS.storage})")
    dash.add_argument(
        "--host",
        default="127.0.0.1",
        help="address to bind (default 127.0.0.1: this machine only)",
    )
    dash.add_argument("--port", type=int, default=8080, help="port (default 8080)")
    _artifact_arg(dash)


def _evaluator_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--evaluator",
        choices=["ped-anova", "fanova", "both"],
        default="both",
        help="importance evaluator(s) (default both)",
    )


def _artifact_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--artifact-dir",
        help="the study's artifact folder (default: `artifacts` beside a SQLite or journal "
        "file; storage/artifacts for PostgreSQL)",
    )


def _artifacts(args: argparse.Namespace) -> str:
    from study.store.url import beside

    return args.artifact_dir or beside(args.storage or DEFAULTS.storage, "artifacts")


def cmd_run(args: argparse.Namespace) -> int:
    toml = config_mod.load_toml(args.config) if args.config else None
    flags = {name.rpartition(".")[2]: getattr(args, name.rpartition(".")[2]) for name in RUN_FLAGS}
    cfg = config_mod.build(toml, study=args.study, storage=args.storage, **flags)
    # imported once the config holds, so a bad flag or key is refused before torch loads
    from study.run import runner
    from study.views.summary import format_summary

    summary = runner.run(cfg, progress=not args.no_progress)
    print(format_summary(summary))
    return 128 + summary.signum if summary.signum else 0


def cmd_best(args: argparse.Namespace) -> int:
    from study.views import results

    print(
        results.best_text(
            config_mod.check_study_name(args.study or DEFAULTS.study),
            args.storage or DEFAULTS.storage,
        )
    )
    return 0


def _quiet() -> None:
    """Optuna's own log lines ([W ...]) and its experimental-feature warnings are noise on a
    command whose output is its files and one summary."""
    import optuna

    from study.quiet import ignore_experimental

    optuna.logging.set_verbosity(optuna.logging.ERROR)
    ignore_experimental()


def cmd_plot(args: argparse.Namespace) -> int:
    from pathlib import Path

    from study.views import plots, results

    _quiet()
    from study.views.artifacts import best_fit

    name = config_mod.check_study_name(args.study or DEFAULTS.study)
    study = results.load_existing(name, args.storage or DEFAULTS.storage)
    evaluators = ("ped-anova", "fanova") if args.evaluator == "both" else (args.evaluator,)
    out = Path(args.out or f"storage/plots/{name}")
    files, notes = plots.plot_study(
        study,
        out,
        best_fit=best_fit(study, _artifacts(args)),
        evaluators=evaluators,
        png=not args.no_png,
    )
    for note in notes:
        print(f"note: {note}", file=sys.stderr)
    print(f"wrote {len(files)} files to {out}/:")
    for f in files:
        print(f"  {f.name}")
    return 0


def cmd_importance(args: argparse.Namespace) -> int:
    import json

    import optuna

    from study.views import analysis, importance, results

    if args.resamples is not None and not 2 <= args.resamples <= 10_000:
        raise ConfigError(f"--resamples must be from 2 to 10,000 (got {args.resamples})")
    _quiet()
    name = config_mod.check_study_name(args.study or DEFAULTS.study)
    study = results.load_existing(name, args.storage or DEFAULTS.storage)
    shortfall = analysis.importance_shortfall(study)
    if shortfall:
        raise ConfigError(shortfall)
    evaluators = analysis.EVALUATORS if args.evaluator == "both" else (args.evaluator,)
    resamples = args.resamples or importance.RESAMPLES
    pruned = study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.PRUNED,))
    # with pruned trials: the validation MSE at each budget, the complete trials' last
    fid = importance.fidelities(study, evaluators, resamples=resamples) if pruned else []
    found = [
        fid[-1].found
        if i == 0 and fid
        else importance.evaluate(study, evaluators, objective=i, resamples=resamples)
        for i in range(len(analysis.objective_names(study)))
    ]
    if args.json:
        out = [f.to_json() for f in found]
        out[0]["fidelities"] = [
            {"epoch": f.epoch, "complete": f.complete, **f.found.to_json()} for f in fid
        ]
        print(json.dumps(out, indent=1))
        return 0
    texts = ["\n".join(importance.lines(f)) for f in found]
    if len(fid) > 1:
        texts[0] += "\n" + "\n".join(importance.fidelity_lines(fid))
    print("\n\n".join(texts))
    return 0


def cmd_report(args: argparse.Namespace) -> int:
    from pathlib import Path

    from study.views import report, results

    _quiet()
    name = config_mod.check_study_name(args.study or DEFAULTS.study)
    study = results.load_existing(name, args.storage or DEFAULTS.storage)
    out = Path(args.out or f"storage/reports/{name}.html")
    text = report.build(study, _artifacts(args))
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(text)
    print(f"wrote {out} ({out.stat().st_size / 1e6:.1f} MB, opens offline)")
    return 0


def cmd_compare(args: argparse.Namespace) -> int:
    from study import compare, store
    from study.run.batched import kernels
    from study.run.opening import resolve_device

    _check_compare_args(args, compare)
    import optuna

    optuna.logging.set_verbosity(optuna.logging.ERROR)  # the bar and the table say it all
    device = resolve_device(args.device, say=lambda line: print(line, file=sys.stderr))
    kernels.check(device.type)  # compare trains on the batched engine
    url = args.storage or DEFAULTS.storage
    store.check(url)  # read-only: a bad URL or a foreign file is one line, nothing written
    rows = _compare_with_bar(args, compare, url, str(device))
    run = (args.factor, args.max_epochs, args.seeds, args.setup)
    text = compare.markdown(*run, rows, device=str(device))
    out = compare.save(*run, text, url)
    print(text)
    logs = shlex.quote(f"{store.beside(url, 'tensorboard')}/{compare.study_name(*run)}")
    print(f"\n(table saved to {out}; curves: tensorboard --logdir {logs})")
    return 0


def _check_compare_args(args: argparse.Namespace, compare) -> None:
    if args.factor not in compare.FACTORS:
        raise ConfigError(
            f"unknown comparison {args.factor!r}; choose one of: {', '.join(compare.FACTORS)}"
        )
    if args.setup not in compare.SETUPS:
        raise ConfigError(
            f"unknown --setup {args.setup!r}; choose one of: {', '.join(compare.SETUPS)}"
        )
    config_mod.validate_train(config_mod.TrainConfig(max_epochs=args.max_epochs))
    if not 2 <= args.seeds <= config_mod.MAX_REPEATS:
        raise ConfigError(
            f"--seeds must be from 2 (a spread) to {config_mod.MAX_REPEATS} (got {args.seeds})"
        )


def _compare_with_bar(args: argparse.Namespace, compare, url: str, device: str) -> list:
    """Run the comparison under a progress bar that appears once it has passed its checks."""
    from tqdm import tqdm

    from study import store

    cells = len(compare.FACTORS[args.factor](args.max_epochs).cells)
    bars = []

    def progress(done: int) -> None:
        if not bars:
            desc = f"compare {args.factor} ({args.seeds} seeds per cell)"
            bars.append(tqdm(total=cells, unit="cell", disable=args.no_progress, desc=desc))
        bars[0].update(done - bars[0].n)

    try:
        return compare.run(
            args.factor,
            url,
            epochs=args.max_epochs,
            seeds=args.seeds,
            device=device,
            setup=args.setup,
            log_dir=store.beside(url, "tensorboard"),
            artifact_dir=store.beside(url, "artifacts"),
            progress=progress,
        )
    finally:
        for bar in bars:
            bar.close()


def cmd_dashboard(args: argparse.Namespace) -> int:
    from study.store import redact
    from study.views import dashboard

    if not 1 <= args.port <= 65535:
        raise ConfigError(f"--port must be from 1 to 65535, got {args.port}")
    url = args.storage or DEFAULTS.storage
    server = dashboard.bind(url, host=args.host, port=args.port, artifact_dir=_artifacts(args))
    if args.host not in ("127.0.0.1", "localhost", "::1"):
        print(
            f"note: --host {args.host} opens the dashboard to the network, and it can delete "
            f"studies; "
            "prefer an SSH tunnel to 127.0.0.1",
            file=sys.stderr,
        )
    print(
        f"optuna-dashboard on {redact(url)} at http://{args.host}:{args.port}/ (Ctrl-C to stop)",
        flush=True,
    )
    server.serve_forever()
    return 0


def _terminate(signum: int, frame: object) -> None:
    raise Interrupted(signum)


def entry(argv: Sequence[str] | None = None) -> NoReturn:
    """The `sinstudy` program: `main`, then an exit with `main`'s status that neither a late
    Ctrl-C or `kill` nor a Ctrl-C already handled can turn into a death by signal.

    Two ways CPython would otherwise end a finished command by SIGINT: it puts the default
    dispositions back before it frees its modules (long, with torch loaded), so a signal landing
    there kills the process (hence `_ignore_stops`); and a KeyboardInterrupt that leaves code run
    from a string (`exec`/`eval`, which dataclasses and typing use while modules import) sets a
    process-wide "unhandled KeyboardInterrupt" flag that stays set though `main` handles the
    exception, and under `python -m` the interpreter then kills itself by SIGINT after its
    teardown, whatever status it was given (hence `_forget_handled_interrupt`)."""
    try:
        code = main(argv, program=True)
    except KeyboardInterrupt as e:  # landed in main's own error handling
        _ignore_stops()
        code = 128 + getattr(e, "signum", signal.SIGINT)
    finally:
        _forget_handled_interrupt()
    sys.exit(code)


def _forget_handled_interrupt() -> None:
    # the flag is the interpreter's own, but every PyRun_* call (public, stable C API) clears it
    # before it runs its code, and "pass" cannot set it again
    ctypes.pythonapi.PyRun_SimpleString(b"pass")


def _ignore_stops() -> None:
    # ignored dispositions survive the interpreter's teardown; a signal now has nothing to stop
    for s in (signal.SIGINT, signal.SIGTERM):
        signal.signal(s, signal.SIG_IGN)


def main(argv: Sequence[str] | None = None, *, program: bool = False) -> int:
    """Run one command; `program`: this process is the command (see `entry`)."""
    # SIGTERM (`kill PID`) as Ctrl-C is: an exception that ends the command through the handlers
    # below, exit 143, not a silent death wherever the command was (a run's engines install
    # their own handlers while they train)
    signal.signal(signal.SIGTERM, _terminate)
    interrupt.redeliver_from_finalisers()
    try:
        return _main(argv)
    finally:
        if program:
            _ignore_stops()


def _main(argv: Sequence[str] | None) -> int:
    args = build_parser().parse_args(argv)
    handler = {
        "run": cmd_run,
        "best": cmd_best,
        "plot": cmd_plot,
        "report": cmd_report,
        "importance": cmd_importance,
        "dashboard": cmd_dashboard,
        "compare": cmd_compare,
    }[args.command]
    try:
        return handler(args)
    except ConfigError as e:
        print(f"sinstudy: error: {e}", file=sys.stderr)
        return 2
    except StorageError as e:
        print(f"sinstudy: error: {e}", file=sys.stderr)
        return e.exit_code
    except KeyboardInterrupt as e:
        print("sinstudy: interrupted", file=sys.stderr)
        return 128 + getattr(e, "signum", signal.SIGINT)
    except BrokenPipeError:  # `sinstudy best | head`: the reader has what it wanted
        # what is still buffered for stdout would fail again at exit (Python's advice)
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 128 + signal.SIGPIPE  # what a shell reports for a tool that SIGPIPE ended
    except Exception as e:  # anything else: one line, unless the user asks for the traceback
        if os.environ.get("SINSTUDY_DEBUG"):
            raise
        if hasattr(e, "exit_code"):  # an error whose message is its own one line with the fix
            print(f"sinstudy: error: {e}", file=sys.stderr)
            return e.exit_code
        print(
            f"sinstudy: error: {type(e).__name__}: {e} (set SINSTUDY_DEBUG=1 for the traceback)",
            file=sys.stderr,
        )
        return 1


if __name__ == "__main__":
    entry()
