"""What the loop sums between two log lines: kept on the device and reduced with one
all-reduce per log line, so logging adds no host synchronisation per step. A window
never spans a change of the global batch (the loop closes it there)."""
from __future__ import annotations

import time

import torch

from . import dist
from .dist import Layout
from .noise_scale import NoiseScale, batches


class LogWindow:
    def __init__(self, device: torch.device, noise: NoiseScale | None):
        self.device, self.noise = device, noise
        self.paused = 0.0  # seconds of evaluation and checkpoints, kept out of images/s, over the run
        self._reset(time.perf_counter())

    def _reset(self, now: float) -> None:
        # loss, small-batch |g|^2, global |G|^2, measured steps (summed over steps and processes)
        self.sums = torch.zeros(4, dtype=torch.float64, device=self.device)
        self.comm = self.comm_exposed = 0.0
        self.steps, self.t0 = 0, now

    def add(self, loss: torch.Tensor, sq_norms, comm_seconds: tuple[float, float]) -> None:
        self.sums[0] += loss
        if sq_norms is not None:
            self.sums[1] += sq_norms[0]
            self.sums[2] += sq_norms[1]
            self.sums[3] += 1
        self.comm += comm_seconds[0]
        self.comm_exposed += comm_seconds[1]
        self.steps += 1

    def state_dict(self) -> dict:
        """The open window, summed over processes (a checkpoint may fall inside a window:
        the resumed run closes it with the same sums, so its noise scale is the same)."""
        return {"sums": dist.all_reduce_sum(self.sums.clone()).tolist(), "steps": self.steps,
                "seconds": time.perf_counter() - self.t0, "comm": self.comm, "comm_exposed": self.comm_exposed}

    def load_state_dict(self, state: dict) -> None:
        """Every process adds its own steps to the sums, which the next close reduces: the
        main process holds what came before the checkpoint, the others start from zero."""
        if dist.info().is_main:
            self.sums = torch.tensor(state["sums"], dtype=torch.float64, device=self.device)
        self.steps, self.comm, self.comm_exposed = state["steps"], state["comm"], state["comm_exposed"]
        self.t0 = time.perf_counter() - state["seconds"]

    def pause(self, seconds: float) -> None:
        self.paused += seconds
        self.t0 += seconds

    def close(self, layout: Layout, late: bool = False) -> dict:
        """The window's log fields (the same on every process); starts the next window.
        `late`: the window lies in the run's second half (for the noise scale's late mean)."""
        now = time.perf_counter()
        loss, small, big, measured = dist.all_reduce_sum(self.sums).tolist()
        seconds = now - self.t0
        record = {"loss": loss / (dist.info().world_size * self.steps), "global_batch": layout.global_batch,
                  "images_per_sec": self.steps * layout.global_batch / seconds,
                  "step_seconds": seconds / self.steps, "comm_seconds": self.comm / self.steps,
                  "comm_exposed_seconds": self.comm_exposed / self.steps}
        pair = batches(layout.world_size, layout.accum_steps, layout.micro_batch)
        if self.noise is not None and measured and pair:
            record.update(self.noise.update(small / measured, big / measured, *pair, late=late))
        self._reset(now)
        return record
