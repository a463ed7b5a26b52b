"""The gradient noise scale (McCandlish et al. 2018, "An Empirical Model of Large-Batch
Training", appendix A.1): how large a batch this problem can use before more samples per
step stop buying fewer steps.

For a gradient G_B estimated from B samples, E|G_B|^2 = |G|^2 + tr(Sigma) / B, where G
is the true gradient and Sigma the per-sample gradient covariance. Two batch sizes
B_small < B_big give both unknowns:

    |G|^2     ~ (B_big |G_big|^2 - B_small |G_small|^2) / (B_big - B_small)
    tr(Sigma) ~ (|G_small|^2 - |G_big|^2) / (1 / B_small - 1 / B_big)

and B_simple = tr(Sigma) / |G|^2, the batch at which a step is about half as useful as
one with the true gradient. Both estimates are noisy, so each is averaged (an
exponential moving average over log windows, with bias correction) before the ratio.

B_simple grows as the loss falls (by an order of magnitude over a run), so a run reports
three values: the smoothed one of each log line, the run mean (sums over every window,
dominated by the early ones), and the mean over the second half of the run, the part
that sets how many steps the last points of accuracy take; `largebatch plan` uses that
one (docs/RESULTS.md compares both with the steps the runs took).

Data-parallel training already computes both norms: each process's gradient before the
all-reduce (B_small = the process's share of the batch) and the global mean after it
(B_big = the global batch). With one process, the first micro-batch's gradient stands in
for the small one (B_small = micro_batch). With one process and no accumulation there is
no second batch size, and nothing is measured.
"""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class Estimate:
    grad_sq: float      # |G|^2
    trace_cov: float    # tr(Sigma)

    @property
    def noise_scale(self) -> float | None:
        return self.trace_cov / self.grad_sq if self.grad_sq > 0 else None


def two_batch(small_sq: float, big_sq: float, b_small: int, b_big: int) -> Estimate:
    """Unbiased |G|^2 and tr(Sigma) from mean squared norms at two batch sizes."""
    grad_sq = (b_big * big_sq - b_small * small_sq) / (b_big - b_small)
    trace_cov = (small_sq - big_sq) / (1.0 / b_small - 1.0 / b_big)
    return Estimate(grad_sq, trace_cov)


class NoiseScale:
    """Smoothed estimates from the mean squared norms of successive log windows. The two
    batch sizes may differ from window to window (batch-size control): |G|^2 and
    tr(Sigma) are properties of the problem, not of the batch."""

    def __init__(self, decay: float = 0.9):
        self.decay = decay
        self.batches: tuple[int, int] | None = None  # of the last window
        self._g = self._s = self._weight = 0.0
        self._sum_g = self._sum_s = 0.0
        self._late_g = self._late_s = 0.0  # the windows of the run's second half
        self._since_g = self._since_s = 0.0  # the windows since start_interval()

    def update(self, small_sq: float, big_sq: float, b_small: int, b_big: int, late: bool = False) -> dict:
        """One log window's mean |G_small|^2 and |G_big|^2 (`late`: the window lies in the
        run's second half); returns the smoothed values."""
        if not 0 < b_small < b_big:
            raise ValueError(f"need 0 < b_small < b_big, got {b_small}, {b_big}")
        e = two_batch(small_sq, big_sq, b_small, b_big)
        d = self.decay
        self._g = d * self._g + (1 - d) * e.grad_sq
        self._s = d * self._s + (1 - d) * e.trace_cov
        self._weight = d * self._weight + (1 - d)
        self._sum_g += e.grad_sq
        self._sum_s += e.trace_cov
        self._since_g += e.grad_sq
        self._since_s += e.trace_cov
        if late:
            self._late_g += e.grad_sq
            self._late_s += e.trace_cov
        self.batches = (b_small, b_big)
        return self.current()

    def current(self) -> dict:
        if self._weight == 0:
            return {}
        smooth = Estimate(self._g / self._weight, self._s / self._weight)
        return {"grad_sq": smooth.grad_sq, "trace_cov": smooth.trace_cov, "noise_scale": smooth.noise_scale,
                "noise_batches": list(self.batches) if self.batches else None}

    def run_mean(self) -> float | None:
        """B_simple from the whole run's averages (what summary.json reports)."""
        return Estimate(self._sum_g, self._sum_s).noise_scale if self._weight else None

    def late_mean(self) -> float | None:
        """B_simple from the averages over the second half of the run."""
        return Estimate(self._late_g, self._late_s).noise_scale

    def interval_mean(self) -> float | None:
        """B_simple from the averages over the windows since start_interval() (what the
        adaptive batch control reads)."""
        return Estimate(self._since_g, self._since_s).noise_scale

    def start_interval(self) -> None:
        self._since_g = self._since_s = 0.0

    def state_dict(self) -> dict:
        return {k: getattr(self, k) for k in ("_g", "_s", "_weight", "_sum_g", "_sum_s", "_late_g", "_late_s",
                                              "_since_g", "_since_s", "batches")}

    def load_state_dict(self, state: dict) -> None:
        for k, v in state.items():
            setattr(self, k, tuple(v) if k == "batches" and v is not None else v)


def batches(world_size: int, accum_steps: int, micro_batch: int) -> tuple[int, int] | None:
    """(B_small, B_big) for a layout, or None where it has only one batch size."""
    big = world_size * accum_steps * micro_batch
    if world_size > 1:
        return accum_steps * micro_batch, big
    if accum_steps > 1:
        return micro_batch, big
    return None


def summary(noise: NoiseScale | None) -> dict:
    """What summary.json says about the noise scale."""
    last = noise.current() if noise is not None else {}
    if not last:
        return {"noise_scale": None, "noise_scale_note": "not measured: one process without accumulation has one "
                "batch size only (set train.micro_batch below the global batch to measure it)"}
    return {"noise_scale": noise.run_mean(), "noise_scale_late": noise.late_mean(),
            "noise_scale_final": last["noise_scale"],
            "grad_sq": last["grad_sq"], "trace_cov": last["trace_cov"], "noise_batches": last["noise_batches"]}
