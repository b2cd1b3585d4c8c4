"""scripts/readme_output.py holds on any machine: what float kernels decide is a pattern, and
what holds everywhere is checked on the run's own output."""

from __future__ import annotations

import importlib.util
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "readme_output.py"
spec = importlib.util.spec_from_file_location("readme_output", SCRIPT)
readme_output = importlib.util.module_from_spec(spec)
spec.loader.exec_module(readme_output)


def _block() -> list[str]:
    text = readme_output.README.read_text()
    lo, hi = readme_output.block(text)
    return text.splitlines()[lo:hi]


def test_another_cpus_best_trial_matches_the_readme_and_holds():
    """The default run on two CPU models (#11 in the README; #27 on another 2-core machine)."""
    other = [
        line.replace(
            "#11: depth=3, width=149, lr=0.0054, activation=leaky_relu",
            "#27: depth=6, width=166, lr=0.000688, activation=relu",
        )
        .replace("5.434e-08  (best epoch 188", "2.328e-08  (best epoch 187")
        .replace("9.742e-08", "3.032e-08")
        .replace("45148,", "139109,")
        .replace("12 complete, 28 pruned", "13 complete, 27 pruned")
        for line in _block()
    ]
    assert other != _block()
    assert readme_output.masked(other) == readme_output.masked(_block())
    assert readme_output.holds(other) == [] == readme_output.holds(_block())


def test_what_must_hold_everywhere_is_checked():
    failed = [x.replace("28 pruned, 0 failed", "27 pruned, 1 failed") for x in _block()]
    worse = [x.replace("9.742e-08", "2.000e-03") for x in _block()]
    assert readme_output.holds(failed) == [
        "this run: not 40 trials complete or pruned and none failed",
        "whole study: not 40 trials complete or pruned and none failed",
    ]
    assert readme_output.holds(worse) == ["test MSE: not below the report's best"]
    changed = [x.replace("storage/tensorboard/sinstudy", "elsewhere") for x in _block()]
    assert readme_output.masked(changed) != readme_output.masked(_block())
