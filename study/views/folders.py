"""The folders a run writes beside its study: TensorBoard runs and model artifacts.

They hold views of the study, not the study: a folder that cannot be written costs its view,
never a trial's result. The rules, for both engines:

- At start, each folder must take a small file (`probe`); a folder that cannot be written at
  all refuses the run before anything is stored (exit 1, the folder and the fix named).
- During a run, a write that fails (a full disk, a folder removed) is reported once per process
  and per folder (`warn_once`); training goes on and the trial is stored as it ends. What the
  failed write would have held is missing from the view: a TensorBoard run stops where it
  stopped; a best trial's weights are marked missing on the trial (`MISSING_ATTR`).
"""

from __future__ import annotations

import errno
import os
import sys
import tempfile
from pathlib import Path

from study.errors import StorageError

# A trial attr: why its weights are not stored though it was best when it finished.
MISSING_ATTR = "model_missing"

PROBE_BYTES = 64 * 1024  # about a trial's TensorBoard run and weights: less is of no use

_warned: set[tuple[str, str]] = set()


def cause(e: OSError) -> str:
    """A file error in a few words: "disk full" for ENOSPC and EDQUOT, else the system's own."""
    if e.errno in (errno.ENOSPC, errno.EDQUOT):
        return "disk full"
    return e.strerror or type(e).__name__


def probe(flag: str, folder: str | Path) -> None:
    """`folder` (or, where it does not exist yet, the nearest folder above it, where it will be
    created) takes a file of PROBE_BYTES, which is removed again; else StorageError (exit 1)
    naming the folder, the cause and the fix."""
    at = Path(folder)
    while not at.exists() and at != at.parent:
        at = at.parent
    fix = f"set [study] {flag} to a writable folder"
    if not at.is_dir() or not os.access(at, os.W_OK | os.X_OK):
        why = "not a folder" if not at.is_dir() else "read-only"
        raise StorageError(
            f"cannot create or write {flag} {str(folder)!r} ({str(at)!r} is {why}); {fix}",
            exit_code=1,
        )
    fd, name = None, None
    try:
        fd, name = tempfile.mkstemp(prefix=".sinstudy-probe-", dir=at)
        os.write(fd, b"\0" * PROBE_BYTES)
    except OSError as e:
        if e.errno in (errno.ENOSPC, errno.EDQUOT):
            fix = f"free space on its disk or {fix}"
        raise StorageError(
            f"cannot write {flag} {str(folder)!r} ({cause(e)} in {str(at)!r}); {fix}",
            exit_code=1,
        ) from None
    finally:
        if fd is not None:
            os.close(fd)
        if name is not None:
            Path(name).unlink(missing_ok=True)


def warn_once(view: str, folder: str | Path, e: OSError, lost: str) -> None:
    """One line on stderr the first time this process fails to write `folder`: the view, the
    folder, the cause and what is `lost`; the run goes on."""
    key = (view, str(folder))
    if key in _warned:
        return
    _warned.add(key)
    print(
        f"sinstudy: warning: cannot write the {view} folder {str(folder)!r} ({cause(e)}); "
        f"{lost}; training and the study go on",
        file=sys.stderr,
        flush=True,
    )
