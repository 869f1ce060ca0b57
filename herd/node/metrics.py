"""This machine's CPU, memory and disk, read with psutil (cheap and synchronous).

Memory pressure is judged from the share of memory in use (psutil's ``percent``, which counts
reclaimable cache as available):

- ``critical`` at 95 % or more: loading another model would push the machine into swap, so the
  router sends no cold loads here;
- ``warn`` at 85 % or more: the router prefers other nodes for cold loads;
- ``normal`` below.

GPUs are not read yet: reports carry ``gpus=()``.
"""

from __future__ import annotations

import psutil

from herd.core.models import CpuInfo, DiskInfo, MemoryInfo, MemoryPressure

PRESSURE_WARN_PERCENT = 85.0
PRESSURE_CRITICAL_PERCENT = 95.0


def pressure_for(percent_used: float) -> MemoryPressure:
    if percent_used >= PRESSURE_CRITICAL_PERCENT:
        return MemoryPressure.CRITICAL
    if percent_used >= PRESSURE_WARN_PERCENT:
        return MemoryPressure.WARN
    return MemoryPressure.NORMAL


def read_system(disk_path: str = "/") -> tuple[CpuInfo, MemoryInfo, DiskInfo]:
    """CPU (cores, percent busy since the previous call), memory and the disk holding
    ``disk_path`` (zeros if it can't be read). The first call's CPU percent is 0.0."""
    memory = psutil.virtual_memory()
    try:
        disk = psutil.disk_usage(disk_path)
        disk_info = DiskInfo(total_bytes=int(disk.total), free_bytes=int(disk.free))
    except OSError:
        disk_info = DiskInfo()
    return (
        CpuInfo(cores=psutil.cpu_count() or 0, percent=float(psutil.cpu_percent(interval=None))),
        MemoryInfo(
            total_bytes=int(memory.total),
            available_bytes=int(memory.available),
            pressure=pressure_for(float(memory.percent)),
        ),
        disk_info,
    )
