"""Stopping cleanly when asked: SIGTERM (what SLURM, Kubernetes and torchrun send before a
kill) and SIGUSR1 (SLURM's `--signal=USR1@SECONDS` warning before the wall-time limit)
make the loop checkpoint at the next step boundary and exit with status 128 + signal."""
from __future__ import annotations

import signal
import threading

import torch

from . import dist

SIGNALS = (signal.SIGTERM, signal.SIGUSR1)


class StopRequest:
    def __init__(self):
        self.signum = 0
        if threading.current_thread() is threading.main_thread():
            for s in SIGNALS:
                signal.signal(s, self._handle)

    def _handle(self, signum, frame) -> None:
        self.signum = signum

    def agreed(self, device: torch.device) -> int:
        """The signal any process received, the same answer on every process (processes
        may receive the signal at different steps; all must stop at the same one)."""
        if not dist.active():  # nothing to agree on, and no device sync on the step path
            return self.signum
        flag = torch.tensor([self.signum], dtype=torch.int64, device=device)
        return int(dist.all_reduce_max(flag).item())

    def restore(self) -> None:
        if threading.current_thread() is threading.main_thread():
            for s in SIGNALS:
                signal.signal(s, signal.SIG_DFL)
