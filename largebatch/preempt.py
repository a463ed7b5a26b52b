"""Stopping cleanly when asked: Ctrl-C (SIGINT), SIGTERM (what SLURM, Kubernetes and
torchrun send before a kill) and SIGUSR1 (SLURM's `--signal=USR1@SECONDS` warning before
the wall-time limit) make the loop checkpoint at the next step boundary and exit with
status 128 + signal. A second Ctrl-C exits at once, without a checkpoint."""
from __future__ import annotations

import signal
import threading
import time

import torch

from . import dist

SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGUSR1)
# Under torchrun a terminal's Ctrl-C reaches each worker twice: from the terminal and,
# a moment later, forwarded by the agent. Only a press after this long is a second one.
REPEAT_SECONDS = 2.0


class StopRequest:
    def __init__(self):
        self.signum, self.first = 0, 0.0
        if threading.current_thread() is threading.main_thread():
            for s in SIGNALS:
                signal.signal(s, self._handle)

    def _handle(self, signum, frame) -> None:
        now = time.monotonic()
        if signum == signal.SIGINT and self.signum == signal.SIGINT and now - self.first > REPEAT_SECONDS:
            raise KeyboardInterrupt
        if not self.signum:
            self.signum, self.first = signum, now
            if signum == signal.SIGINT and dist.info().is_main:
                print("\nlargebatch: Ctrl-C: checkpointing at the end of this step; press again to exit "
                      "without a checkpoint", flush=True)

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
                signal.signal(s, signal.SIG_DFL if s != signal.SIGINT else signal.default_int_handler)
