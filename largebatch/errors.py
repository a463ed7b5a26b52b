"""Errors a user can act on. The CLI prints their message as one line (no traceback)
and exits with their code; any other exception is a bug and keeps its traceback.

Exit codes: 2 a user error (config, data, checkpoint, run directory, disk), 3 the run
diverged, 128 + N stopped by signal N after checkpointing (130 for Ctrl-C).
"""
from __future__ import annotations


class UserError(Exception):
    exit_code = 2


class Diverged(UserError):
    """The loss or the weights became non-finite; no checkpoint was written from them."""
    exit_code = 3
