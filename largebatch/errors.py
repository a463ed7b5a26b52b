"""Errors a user can act on. The CLI prints their message as one line (no traceback)
and exits with their code; any other exception is a bug and keeps its traceback.

Exit codes: 2 a user error (config, data, checkpoint, run directory, disk), 3 the run
diverged, 128 + N stopped by signal N after checkpointing (130 for Ctrl-C).
"""
from __future__ import annotations

import errno
import shutil
from pathlib import Path


class UserError(Exception):
    exit_code = 2


class Diverged(UserError):
    """The loss or the weights became non-finite; no checkpoint was written from them."""
    exit_code = 3


def write_failure(e: Exception, directory: Path) -> str:
    """Why a write into `directory` failed, in words a user can act on."""
    directory = Path(directory)
    free = shutil.disk_usage(directory).free if directory.exists() else None
    if getattr(e, "errno", None) == errno.ENOSPC or (free is not None and free < 1 << 20):
        return f"the disk is full ({free or 0} bytes free in {directory}): free space and resume with --resume"
    return getattr(e, "strerror", None) or str(e).splitlines()[0]
