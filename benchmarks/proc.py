"""Resident memory of a process from Linux /proc: now, at its peak, and split by what it maps."""

from __future__ import annotations

import re
from collections import Counter

MB = 1024.0  # /proc reports kB

# What a resident page belongs to, by the path of its mapping (first match wins).
_GROUPS: tuple[tuple[str, re.Pattern[str]], ...] = (
    ("CUDA libraries (torch's CUDA build; unused on a CPU server)",
     re.compile(r"/nvidia/|/cuda/|libtorch_cuda|libc10_cuda|libcudnn|libcublas|libnccl|libcusparse|libcufft|libnvrtc")),
    ("torch's CPU libraries", re.compile(r"/torch/lib/")),
    ("other shared libraries", re.compile(r"\.so(\.|$)")),
    ("Python heap and other anonymous memory", re.compile(r"^\[heap\]$|^\[anon|^$")),
)


def status_mb(field: str, pid: int | str = "self") -> float:
    """A memory line of /proc/<pid>/status (VmRSS, VmHWM) in MB."""
    with open(f"/proc/{pid}/status") as handle:
        for line in handle:
            if line.startswith(field + ":"):
                return int(line.split()[1]) / MB
    raise KeyError(field)


def rss_mb() -> float:
    """Current resident set size in MB."""
    return status_mb("VmRSS")


def mapping_groups(pid: int | str = "self") -> dict[str, float]:
    """A process's resident set in MB, split by what each mapping holds (/proc/<pid>/smaps)."""
    totals: Counter[str] = Counter()
    group = "other"
    with open(f"/proc/{pid}/smaps") as handle:
        for line in handle:
            if re.match(r"^[0-9a-f]+-[0-9a-f]+ ", line):
                parts = line.split(maxsplit=5)
                path = parts[5].strip() if len(parts) > 5 else ""
                group = next((name for name, pattern in _GROUPS if pattern.search(path)), "other")
            elif line.startswith("Rss:"):
                totals[group] += int(line.split()[1])
    return {name: round(kb / MB, 1) for name, kb in totals.most_common()}


def cpu_model() -> str:
    """The CPU's model name (/proc/cpuinfo), or what the platform says."""
    import platform

    try:
        with open("/proc/cpuinfo") as handle:
            return next(line.split(":", 1)[1].strip() for line in handle if line.startswith("model name"))
    except (OSError, StopIteration):
        return platform.processor() or "unknown CPU"
