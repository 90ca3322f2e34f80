"""Training throughput for the trackers: images/s, tokens/s and peak accelerator memory."""

from __future__ import annotations

import time

import torch
from accelerate import Accelerator


class ThroughputMeter:
    """Measures each optimiser step from the end of the previous one (`restart`) to `step`.

    The interval covers loading the batch, forward, backward and the optimiser; `restart` after the evaluation,
    refresh and checkpoint work of a step leaves them out. Counts are summed over all processes.
    """

    def __init__(self, accelerator: Accelerator):
        self.accelerator = accelerator
        self.cuda = accelerator.device.type == "cuda"
        self.restart()

    def restart(self) -> None:
        self.start = time.perf_counter()

    def step(self, images: int, tokens: int | None = None) -> dict[str, float]:
        """`{"images_per_s", "tokens_per_s" (with `tokens`), "gpu_memory_gib" (on CUDA)}` for this process's counts.

        Args:
            images: images of this process's micro-batches in the step.
            tokens: target tokens (padding excluded) of those micro-batches, or None (SCST: no targets).
        """
        counts = torch.tensor([images, tokens or 0], dtype=torch.float64, device=self.accelerator.device)
        counts = self.accelerator.reduce(counts, reduction="sum")  # (2,) over every process
        seconds = max(time.perf_counter() - self.start, 1e-9)
        logs = {"images_per_s": float(counts[0]) / seconds}
        if tokens is not None:
            logs["tokens_per_s"] = float(counts[1]) / seconds
        if self.cuda:
            logs["gpu_memory_gib"] = torch.cuda.max_memory_allocated(self.accelerator.device) / 2**30
            torch.cuda.reset_peak_memory_stats(self.accelerator.device)
        return logs
