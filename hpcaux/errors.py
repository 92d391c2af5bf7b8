"""The one exception type that reaches users as a single clear line.

Anything a user can get wrong (config, CLI arguments, data, run directories) raises
UserError; the CLI prints it as `hpcaux: error: ...` and exits with status 2 before
anything is written. A file system that refuses a write (full, over quota, read-only)
is the user's to fix too: `storage_problem` recognises it, so it also becomes one line.
Everything else is a bug and keeps its traceback.
"""
import errno
from pathlib import Path

STORAGE_ERRNOS = {errno.ENOSPC: "no space left on the device", errno.EDQUOT: "disk quota exceeded",
                  errno.EROFS: "read-only file system", errno.EACCES: "permission denied",
                  errno.EFBIG: "file too large for the file system or the process limit"}


class UserError(Exception):
    """A mistake in the user's input, reported as one line with exit status 2."""

    exit_status = 2


KEPT = "the last committed checkpoint is kept"


def refuse_file_in_the_way(folder: Path, what: str):
    """A folder about to be created where it, or a parent, is a file: one line, not
    mkdir's traceback (`hpcaux data` into a file, `analyze --out` a file)."""
    blocking = next((p for p in (folder, *folder.parents) if p.exists()), None)
    if blocking is not None and not blocking.is_dir():
        raise UserError(f"{what} {folder} is (or is below) {blocking}, a file, not a directory")


def storage_problem(err: Exception) -> str | None:
    """One line for an error that means 'this file system will not take the write'.

    h5py reports HDF5's failures as OSError or ValueError, without errno; HDF5 says
    'file write failed' and sometimes 'errno = N' in the text.
    """
    text = str(err).splitlines()[0][:160] if str(err) else type(err).__name__
    code = getattr(err, "errno", None)
    if code is None:
        for candidate in STORAGE_ERRNOS:
            if f"errno = {candidate}," in str(err):
                code = candidate
    if code in STORAGE_ERRNOS:
        where = f" writing {err.filename}" if getattr(err, "filename", None) else ""
        return f"{STORAGE_ERRNOS[code]}{where} ({text}); {KEPT}"
    if "file write failed" in str(err):
        return f"HDF5 could not write to RUN/aux.h5 ({text}): is the file system full, over quota or read-only? {KEPT}"
    return None
