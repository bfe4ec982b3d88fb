"""Measuring helpers shared by `sedd bench` and the GPU check: timing, peak memory, matmul peak, FLOPs."""
from __future__ import annotations

import os
import platform
import resource
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from sedd_core.config import SEDDConfig


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def stats(samples: list[float]) -> dict[str, Any]:
    return {"min": min(samples), "median": statistics.median(samples), "n": len(samples),
            "all": [round(s, 6) for s in samples]}


def timed(fn: Callable[[], Any], device: torch.device) -> tuple[float, Any]:
    synchronize(device)
    start = time.perf_counter()
    out = fn()
    synchronize(device)
    return time.perf_counter() - start, out


class PeakMemory:
    """Peak memory of what runs inside, above what was held before it."""

    def __init__(self, device: torch.device):
        self.device = device
        self.method = memory_method(device)
        self.peak_bytes: int | None = None

    def __enter__(self):
        if self.device.type == "cuda":
            synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self._base = torch.cuda.memory_allocated(self.device)
        elif self.method.startswith("VmHWM"):
            _reset_peak_rss()
            self._base = _proc_status_kb("VmRSS") * 1024
        else:
            self._base = _ru_maxrss_bytes()
        return self

    def __exit__(self, *exc):
        if self.device.type == "cuda":
            synchronize(self.device)
            self.peak_bytes = torch.cuda.max_memory_allocated(self.device) - self._base
        elif self.method.startswith("VmHWM"):
            self.peak_bytes = max(_proc_status_kb("VmHWM") * 1024 - self._base, 0)
        else:
            self.peak_bytes = max(_ru_maxrss_bytes() - self._base, 0)
        return False


def _proc_status_kb(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise KeyError(field)


def _reset_peak_rss() -> None:
    Path("/proc/self/clear_refs").write_text("5")


def _ru_maxrss_bytes() -> int:
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss if sys.platform == "darwin" else rss * 1024


def memory_method(device: torch.device) -> str:
    if device.type == "cuda":
        return "torch.cuda.max_memory_allocated above the allocation before the configuration"
    try:
        _reset_peak_rss()
        _proc_status_kb("VmHWM")
        return "VmHWM (peak resident set) above VmRSS before the configuration, reset via /proc/self/clear_refs"
    except OSError:
        return "ru_maxrss growth (a process-lifetime high-water mark: 0 when an earlier configuration peaked higher)"
    except KeyError:
        return "ru_maxrss growth (a process-lifetime high-water mark: 0 when an earlier configuration peaked higher)"


class MatmulPeak:
    """The machine's practical peak at a dtype: the best FLOP/s of a large square matmul.

    Sampled again between the timed runs of the other sections, so that a peak and the runs it is
    compared with see the same machine (on a shared machine the load drifts); fractions use the best
    sample of the whole run, which makes them conservative."""

    def __init__(self, device: torch.device, dtype: torch.dtype, size: int = 2048):
        self.device, self.size = device, size
        self.a = torch.randn(size, size, device=device).to(dtype)
        self.b = torch.randn(size, size, device=device).to(dtype)
        self.out = torch.empty(size, size, device=device, dtype=dtype)
        torch.matmul(self.a, self.b, out=self.out)  # warm up
        self.inner = 1 if device.type == "cpu" else 20
        self.samples: list[float] = []

    def sample(self, times: int = 1) -> None:
        for _ in range(times):
            def run():
                for _ in range(self.inner):
                    torch.matmul(self.a, self.b, out=self.out)
            seconds, _ = timed(run, self.device)
            self.samples.append(2 * self.size**3 * self.inner / seconds / 1e9)

    @property
    def gflops(self) -> float:
        return max(self.samples)

    def report(self) -> dict[str, Any]:
        return {"size": self.size, "gflops": self.gflops, "median_gflops": statistics.median(self.samples),
                "samples": len(self.samples)}

@dataclass
class FlopCount:
    """Analytic FLOPs (two per multiply-add) of the network's matmuls. Per token: each block's qkv, out
    and MLP projections (12 H^2 multiply-adds) and attention (2 L H); per row: the adaLN modulations and
    the sigma map; per position where it is computed: the output layer (H V). Norms, softmax and other
    elementwise work are not counted."""

    hidden: int
    cond: int
    blocks: int
    vocab: int

    def trunk(self, rows: int, length: int) -> float:
        per_token = self.blocks * (2 * 12 * self.hidden**2 + 4 * length * self.hidden)
        per_row = (self.blocks * 2 * self.cond * 6 * self.hidden  # adaLN of every block
                   + 2 * self.cond * 2 * self.hidden  # adaLN of the output layer
                   + 2 * (256 * self.cond + self.cond**2))  # sigma map
        return rows * length * per_token + rows * per_row

    def output(self, positions: int) -> float:
        return positions * 2 * self.hidden * self.vocab

    def sampling_loop(self, rows: int, length: int, passes: int, positions: int) -> float:
        """FLOPs of `passes` sampling passes that computed the output at `positions` positions in all.

        The last block runs its attention projection and MLP (9 H^2 multiply-adds per token) only at
        those positions, like the output layer; the rest of the trunk runs at every position."""
        skipped = passes * rows * length - positions
        return passes * self.trunk(rows, length) - skipped * 2 * 9 * self.hidden**2 + self.output(positions)

    @classmethod
    def of(cls, config: SEDDConfig) -> FlopCount:
        m = config.model
        return cls(m.hidden_size, m.cond_dim, m.n_blocks, config.vocab_size)


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return f"{line.split(':', 1)[1].strip()} ({os.cpu_count()} logical CPUs)"
    except OSError:
        pass
    return platform.processor() or "cpu"

