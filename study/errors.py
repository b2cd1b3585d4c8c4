"""Errors a command reports in one line, importable without torch or Optuna (the CLI catches
them before it has loaded either)."""

from __future__ import annotations


class StorageError(Exception):
    """The storage cannot be used as given. `exit_code`: 2 for bad input, 1 for the environment."""

    def __init__(self, message: str, exit_code: int = 2):
        super().__init__(message)
        self.exit_code = exit_code
