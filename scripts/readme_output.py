"""Keep the README's example output true: run command (a) as the README shows it, in a fresh
folder, and compare its output with the block in README.md (`--write`: replace the block).

    python scripts/readme_output.py [--write]

Times and the artifact id differ from run to run, and what float kernels decide differs between
CPU models (which trial is best, its parameters and MSEs, how many trials were pruned): these
are compared as patterns, so the check holds on any machine, and the run's own output must
show what holds everywhere: 40 trials, none failed, the best test MSE below the report's.
Everything else (labels, units, the study, storage and commands) must match. Exit 1 with a
diff when the README is stale.
"""

from __future__ import annotations

import argparse
import difflib
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

README = Path(__file__).resolve().parents[1] / "README.md"
START = "<!-- output of command (a): scripts/readme_output.py keeps it true -->"
VOLATILE = [
    (re.compile(r"\(\d+\.\d s on "), "(<s> s on "),
    (re.compile(r"trained in \d+\.\d s"), "trained in <s> s"),
    (re.compile(r"share of the device: \d+\.\d s"), "share of the device: <s> s"),
    (re.compile(r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}"), "<id>"),
    # decided by float kernels, which differ between CPU models
    (re.compile(r"\d+ complete, \d+ pruned"), "<n> complete, <n> pruned"),
    (
        re.compile(r"#\d+: depth=\d+, width=\d+, lr=[\d.e-]+, activation=\w+"),
        "#<n>: depth=<n>, width=<n>, lr=<x>, activation=<name>",
    ),
    (re.compile(r"(val|test) MSE( +)[\d.e+-]+"), r"\1 MSE\2<x>"),
    (re.compile(r"best epoch \d+ of"), "best epoch <n> of"),
    (re.compile(r"parameters( +)\d+,"), r"parameters\1<n>,"),
]
TRIALS = 40  # command (a)'s --n-trials default


def holds(lines: list[str]) -> list[str]:
    """What the run must show on any machine; the problems found."""
    text = "\n".join(lines)
    bad = []
    for label in ("this run", "whole study"):
        m = re.search(rf"^{label} +(\d+) complete, (\d+) pruned, (\d+) failed$", text, re.M)
        if not m or int(m[1]) + int(m[2]) != TRIALS or m[3] != "0":
            bad.append(f"{label}: not {TRIALS} trials complete or pruned and none failed")
    m = re.search(r"^test MSE +([\d.e+-]+)  \(report's best: ([\d.e+-]+)\)$", text, re.M)
    if not m or not float(m[1]) < float(m[2]):
        bad.append("test MSE: not below the report's best")
    return bad


def run() -> list[str]:
    with tempfile.TemporaryDirectory() as tmp:
        env = {**os.environ, "PYTHONUNBUFFERED": "1", "CUDA_VISIBLE_DEVICES": ""}
        r = subprocess.run(
            [sys.executable, "-m", "study", "run", "--no-progress"],
            cwd=tmp,
            env=env,
            capture_output=True,
            text=True,
            timeout=600,
        )
    if r.returncode:
        sys.exit(f"readme_output: `sinstudy run` failed ({r.returncode}): {r.stderr.strip()}")
    return r.stderr.splitlines() + r.stdout.splitlines()  # the device note comes first


def block(text: str) -> tuple[int, int]:
    """Line range of the README's output block (inside the fence after START)."""
    lines = text.splitlines()
    i = lines.index(START)
    assert lines[i + 1].startswith("```"), "the output block must follow the marker"
    j = next(k for k in range(i + 2, len(lines)) if lines[k].startswith("```"))
    return i + 2, j


def masked(lines: list[str]) -> list[str]:
    out = []
    for line in lines:
        for pattern, repl in VOLATILE:
            line = pattern.sub(repl, line)
        out.append(line)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--write", action="store_true", help="replace the README's block")
    args = ap.parse_args()
    text = README.read_text()
    lo, hi = block(text)
    lines = text.splitlines()
    got = run()
    if args.write:
        README.write_text("\n".join(lines[:lo] + got + lines[hi:]) + "\n")
        print(f"README.md: output block rewritten ({len(got)} lines)")
        return
    problems = holds(got)
    if problems:
        sys.exit("readme_output: command (a)'s output: " + "; ".join(problems))
    diff = list(
        difflib.unified_diff(masked(lines[lo:hi]), masked(got), "README.md", "now", lineterm="")
    )
    if diff:
        print("\n".join(diff))
        sys.exit(
            "readme_output: the README's output of command (a) is stale; "
            "run `python scripts/readme_output.py --write` and commit"
        )
    print("README.md: the output of command (a) is current")


if __name__ == "__main__":
    main()
