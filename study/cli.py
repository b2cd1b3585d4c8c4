"""Thin command line: parse, call the library, print, exit. 0 ok, 2 bad input, 1 other failure."""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence

from . import config as config_mod
from .config import ConfigError, StudyConfig
from .storage import StorageError

DEFAULTS = StudyConfig()


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # one line, exit 2 (argparse's own usage dump is noise)
        self.exit(2, f"sinstudy: error: {message} (see sinstudy {self.prog.split()[-1]} --help)\n")


def _study_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--study", help=f"study name (default {DEFAULTS.study!r}); an existing one is continued")
    p.add_argument("--storage", help=f"Optuna storage URL (default {DEFAULTS.storage})")


def _id_list(text: str) -> tuple[int, ...]:
    try:
        ids = tuple(int(x) for x in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"--devices takes GPU ids like 0,1 (got {text!r})") from None
    return ids


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="sinstudy", description="Optuna studies of an MLP that learns sin(x) on [0, 2*pi).")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

    run = sub.add_parser("run", help="run (or continue) a study", description="Run trials and print a summary.")
    run.add_argument("--config", help="TOML file with [study], [data], [train], [search_space] tables")
    _study_args(run)
    run.add_argument("--n-trials", type=int, help=f"trials this run adds (default {DEFAULTS.n_trials})")
    run.add_argument("--timeout", type=float, help="stop starting trials after this many seconds")
    run.add_argument("--max-epochs", type=int, help=f"epochs per trial (default {DEFAULTS.train.max_epochs})")
    run.add_argument("--sampler", help=f"one of {', '.join(config_mod.SAMPLERS)} (default {DEFAULTS.sampler})")
    run.add_argument("--pruner", help=f"one of {', '.join(config_mod.PRUNERS)} (default {DEFAULTS.pruner})")
    run.add_argument("--seed", type=int, help=f"sampler and weight seed (default {DEFAULTS.seed})")
    run.add_argument("--device", help="auto (default), cpu, cuda or cuda:N")
    run.add_argument("--workers", type=int, help="worker processes on this machine sharing the study (default 1)")
    run.add_argument("--devices", type=_id_list, help="GPU ids, one worker per GPU, e.g. 0,1,2,3")
    run.add_argument("--no-progress", action="store_true", help="no progress bar")

    best = sub.add_parser("best", help="print the best trial, from storage alone")
    _study_args(best)
    return parser


def cmd_run(args: argparse.Namespace) -> int:
    from . import runner  # imported here so `--help` and bad flags answer fast (torch is slow to load)

    toml = config_mod.load_toml(args.config) if args.config else None
    cfg = config_mod.build(
        toml, study=args.study, storage=args.storage, n_trials=args.n_trials, timeout=args.timeout,
        max_epochs=args.max_epochs, sampler=args.sampler, pruner=args.pruner, seed=args.seed, device=args.device,
        workers=args.workers, devices=args.devices,
    )
    summary = runner.run(cfg, progress=not args.no_progress)
    print(runner.format_summary(summary))
    return 128 + summary.signum if summary.signum else 0


def cmd_best(args: argparse.Namespace) -> int:
    from . import results

    print(results.best_text(args.study or DEFAULTS.study, args.storage or DEFAULTS.storage))
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    handler = {"run": cmd_run, "best": cmd_best}[args.command]
    try:
        return handler(args)
    except ConfigError as e:
        print(f"sinstudy: error: {e}", file=sys.stderr)
        return 2
    except StorageError as e:
        print(f"sinstudy: error: {e}", file=sys.stderr)
        return e.exit_code
    except KeyboardInterrupt:
        print("sinstudy: interrupted", file=sys.stderr)
        return 130
    except Exception as e:  # anything else: one line, unless the user asks for the traceback
        if os.environ.get("SINSTUDY_DEBUG"):
            raise
        print(f"sinstudy: error: {type(e).__name__}: {e} (set SINSTUDY_DEBUG=1 for the traceback)", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
