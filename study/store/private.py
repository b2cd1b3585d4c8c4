"""Every private Optuna API sinstudy uses, in one list, with the Optuna versions it was tested on.

pyproject.toml pins optuna to TESTED_OPTUNA; tests/test_storage.py fails when a release removes
one of these names (and the field-by-field tests of tests/test_bulk.py when one changes what it
stores). Each entry: the dotted name, where it is used, and why no public API serves.
"""

from __future__ import annotations

TESTED_OPTUNA = ">=5.0,<6"

PRIVATE_OPTUNA = {
    # study.store.rdb, .sqlite, .postgres: bulk SQL through Optuna's own ORM models
    "optuna.storages._rdb.models": "the tables, stored representations of values (rdb.py)",
    "optuna.storages._rdb.storage._create_scoped_session": "Optuna's transaction scope (rdb.py)",
    "optuna.storages._rdb.models.TrialModel.count_past_trials": "how Optuna numbers a trial",
    "optuna.storages._rdb.models.StudyModel.find_or_raise_by_id": "the study lock Optuna takes",
    "optuna.storages._rdb.models.TrialModel._datetime_start_utc": "a start time as stored",
    "optuna.storages._rdb.models.TrialModel._datetime_complete_utc": "an end time as stored",
    "optuna.storages.RDBStorage._get_stale_trial_ids": "Optuna's stale check, which fails and "
    "retries as one step here (rdb.SweepingStorage)",
    # rdb.SweepingStorage: the calls Optuna's cached storage makes, each waited out in an outage
    "optuna.storages.RDBStorage._create_new_trial": "a new trial (ask), found again after an "
    "unanswered commit",
    "optuna.storages.RDBStorage._set_trial_param": "a suggested parameter",
    "optuna.storages.RDBStorage._get_trials": "the trials read (the sampler's view)",
    "optuna.storages.RDBStorage._get_best_trial_id": "the best trial",
    # study.store.journal: the file lock held across a check and its write; a tolerant reader
    "optuna.storages.journal._storage.JournalOperation": "the record kinds a line may hold",
    "optuna.storages.JournalStorage._backend": "the file backend under the storage",
    "optuna.storages.JournalStorage._thread_lock": "Optuna's in-process lock, made reentrant",
    "optuna.storages.journal.JournalFileBackend._lock": "the file lock object",
    "optuna.storages.journal.JournalFileBackend._file_path": "the file: read, named in errors",
    "optuna.storages.journal.JournalFileBackend._log_number_offset": "where each record starts",
    # everywhere (as Optuna's own integrations read them): a study's storage and a trial's id
    "optuna.Study._storage": "the storage of a loaded study",
    "optuna.Study._study_id": "its id in that storage",
    "optuna.trial.FrozenTrial._trial_id": "a trial's id in storage (its number is per study)",
}
