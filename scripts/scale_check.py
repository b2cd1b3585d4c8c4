"""Run one study per (engine, storage, workers) on a tiny problem and print what survived.

    python scripts/scale_check.py [--trials 40] [--workers 1,4,8] [--engines batched,standard]
                                  [--storages sqlite,journal,postgresql]

Each worker runs one engine (--workers N: N batched engines, or N standard ones). Columns:
trials asked, finished (COMPLETE + PRUNED), lost (FAIL), duplicate numbers, parameter sets
trained twice, trials left RUNNING or WAITING, "database is locked" messages, wall seconds.
PostgreSQL uses a throw-away database on $SINSTUDY_TEST_PG (default
postgresql://postgres@127.0.0.1:5432/postgres) and drops it after.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
import uuid
from collections import Counter
from pathlib import Path

import optuna

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from conftest import TINY_TOML  # noqa: E402  (the tests' tiny problem: seconds per trial batch)

from study import store  # noqa: E402

PG_ADMIN = os.environ.get("SINSTUDY_TEST_PG", "postgresql://postgres@127.0.0.1:5432/postgres")


def pg_database(use: str = "scale") -> tuple[str, callable]:
    """A throw-away database on PG_ADMIN's server: its URL, and the call that drops it."""
    import psycopg

    name = f"sinstudy_{use}_{uuid.uuid4().hex[:8]}"
    with psycopg.connect(PG_ADMIN, autocommit=True) as con:
        con.execute(f'CREATE DATABASE "{name}"')

    def drop() -> None:
        with psycopg.connect(PG_ADMIN, autocommit=True) as con:
            con.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')

    return PG_ADMIN.rsplit("/", 1)[0] + "/" + name, drop


def one(engine: str, kind: str, workers: int, trials: int, epochs: int) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        (Path(tmp) / "tiny.toml").write_text(TINY_TOML)
        drop = None
        url = {"sqlite": f"sqlite:///{tmp}/s.db", "journal": f"journal:///{tmp}/s.log"}.get(kind)
        if kind == "postgresql":
            url, drop = pg_database()
        try:
            t0 = time.perf_counter()
            r = subprocess.run(
                [
                    sys.executable,
                    "-m",
                    "study",
                    "run",
                    "--config",
                    "tiny.toml",
                    "--no-progress",
                    "--storage",
                    url,
                    "--n-trials",
                    str(trials),
                    "--workers",
                    str(workers),
                    "--max-epochs",
                    str(epochs),
                    "--engine",
                    engine,
                ],
                cwd=tmp,
                capture_output=True,
                text=True,
            )
            wall = time.perf_counter() - t0
            study = optuna.load_study(study_name="sinstudy", storage=store.load(url))
            states = Counter(t.state.name for t in study.trials)
            numbers = [t.number for t in study.trials]
            points = [
                tuple(sorted(t.params.items())) for t in study.trials if t.state.name != "FAIL"
            ]
            del study
        finally:
            if drop:
                drop()
    return {
        "engine": engine,
        "storage": kind,
        "workers": workers,
        "asked": trials,
        "exit": r.returncode,
        "finished": states["COMPLETE"] + states["PRUNED"],
        "lost": states["FAIL"],
        "duplicates": len(numbers) - len(set(numbers)),
        "twice": len(points) - len(set(points)),
        "running": states["RUNNING"] + states["WAITING"],
        "locked": (r.stdout + r.stderr).count("database is locked"),
        "wall_s": round(wall, 1),
    }


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--trials", type=int, default=40)
    ap.add_argument("--epochs", type=int, default=6)
    ap.add_argument("--workers", default="1,4,8")
    ap.add_argument("--storages", default="sqlite,journal,postgresql")
    ap.add_argument("--engines", default="batched,standard")
    a = ap.parse_args()
    rows = [
        one(e, k, int(w), a.trials, a.epochs)
        for e in a.engines.split(",")
        for k in a.storages.split(",")
        for w in a.workers.split(",")
    ]
    cols = list(rows[0])
    print("| " + " | ".join(cols) + " |")
    print("|" + "---|" * len(cols))
    for row in rows:
        print("| " + " | ".join(str(row[c]) for c in cols) + " |")


if __name__ == "__main__":
    main()
