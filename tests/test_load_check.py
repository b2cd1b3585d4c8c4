"""scripts/load_check.py at a small size: simulated engines' writers on one PostgreSQL study."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "load_check.py"


def test_simulated_engines_lose_nothing_and_report_lag_and_sync(pg_url, tmp_path):
    args = ["--engines", "2", "--slots", "8", "--seconds", "3", "--epochs", "9"]
    r = subprocess.run(
        [sys.executable, str(SCRIPT), *args, "--epochs-per-s", "6", "--storage", pg_url],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert r.returncode == 0, r.stdout + r.stderr
    lines = r.stdout.strip().splitlines()
    assert re.fullmatch(r"lag p95 \d+\.\d\d s, sync p95 \d+\.\d{3} s, lost 0", lines[-1]), lines
    engines = [x for x in lines if x.startswith("engine ")]
    assert len(engines) == 2
    for line in engines:  # each engine started and ended trials, and synced
        started, ended = map(int, re.search(r"(\d+) trials started, (\d+) ended", line).groups())
        assert started == ended > 8, line
        assert int(re.search(r"(\d+) syncs", line).group(1)) >= 1, line
    assert re.search(r"database: \d+ connections at peak", r.stdout), r.stdout


def test_a_bad_flag_is_one_line_and_exit_2(tmp_path):
    r = subprocess.run(
        [sys.executable, str(SCRIPT), "--slots", "0"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert r.returncode == 2
    assert "--slots must be at least 1 (got 0)" in r.stderr.strip().splitlines()[-1]
