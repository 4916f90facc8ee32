"""Peak-memory probes for CPU benchmarks (Linux): the resident set now, and the high-water mark since a reset.

Used by the benchmarks that measure the memory of one call in a fresh process; on CUDA they use
`torch.cuda.max_memory_allocated` instead.
"""
from __future__ import annotations

import os
import resource
import sys
from pathlib import Path


def current_rss() -> int | None:
    try:  # Linux: resident pages of this process now
        return int(Path("/proc/self/statm").read_text().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return None


def reset_peak_rss() -> bool:
    """Linux >= 4.0: reset this process's peak RSS (VmHWM) to its current RSS, so the next reading is the peak
    of what runs in between. False where that is not possible (then the ru_maxrss fallback is used)."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return vm_hwm() is not None
    except OSError:
        return False


def vm_hwm() -> int | None:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024  # kB
    except (OSError, ValueError, IndexError):
        pass
    return None


def peak_rss() -> int:
    scale = 1 if sys.platform == "darwin" else 1024  # ru_maxrss is bytes on macOS, KiB on Linux
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale
