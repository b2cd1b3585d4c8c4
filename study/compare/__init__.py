"""The course report's comparisons: its factors as data (factors), each factor's hypothesis
judged from its cells (verdicts, with the evidence), and the runs that train the cells (runner).
"""

from study.compare import evidence
from study.compare.factors import (
    FACTORS,
    HYPOTHESES,
    NETS,
    SETUPS,
    Factor,
    Setup,
    cell_config,
    cell_data,
    never_acts,
    study_name,
)
from study.compare.runner import body, describe_base, markdown, ranking, run, save, stats, table
from study.compare.verdicts import (
    FAILED,
    HELD,
    JUDGES,
    UNDECIDED,
    CellStats,
    Verdict,
    _mean_std,
    command,
    settled,
    summary,
    verdicts,
)
from study.trial.course import TEST_MSE as REPORT_TEST_MSE

__all__ = [
    "FACTORS",
    "FAILED",
    "HELD",
    "HYPOTHESES",
    "JUDGES",
    "NETS",
    "REPORT_TEST_MSE",
    "SETUPS",
    "UNDECIDED",
    "CellStats",
    "Factor",
    "Setup",
    "Verdict",
    "_mean_std",
    "body",
    "cell_config",
    "cell_data",
    "command",
    "describe_base",
    "evidence",
    "markdown",
    "never_acts",
    "ranking",
    "run",
    "save",
    "settled",
    "stats",
    "study_name",
    "summary",
    "table",
    "verdicts",
]
