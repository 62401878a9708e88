"""A stage's peak memory, as its metrics report it."""

from __future__ import annotations

from pathlib import Path

import torch


class PeakMemory:
    """Peak memory from now on: resident set of this process (Linux: VmHWM after a reset through
    /proc/self/clear_refs) and, on CUDA, the allocator's peak. The reset also lowers what
    `/usr/bin/time` reports as the process's maximum resident set to the last stage's peak;
    cgroup accounting (Slurm, containers) is not affected."""

    def __init__(self):
        self._reset = False
        try:
            Path("/proc/self/clear_refs").write_text("5")
            self._reset = True
        except OSError:
            pass
        if torch.cuda.is_available():
            torch.cuda.reset_peak_memory_stats()

    def rss_mb(self) -> float | None:
        try:
            for line in Path("/proc/self/status").read_text().splitlines():
                if line.startswith("VmHWM:") and self._reset:
                    return round(int(line.split()[1]) / 1024, 1)
        except OSError:
            pass
        return None

    def device(self) -> dict[str, float]:
        if not torch.cuda.is_available():
            return {}
        return {"peak_gpu_mb": round(torch.cuda.max_memory_allocated() / 2**20, 1)}
