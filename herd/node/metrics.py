"""This machine's CPU, memory and disk, read with psutil (cheap and synchronous)."""

from __future__ import annotations

import psutil

from herd.models import CpuInfo, DiskInfo, MemoryInfo, MemoryPressure

# Memory in use (percent) at which the node reports pressure. At "critical" the router stops
# sending cold loads here: loading a model would push the machine into swap.
PRESSURE_WARN_PERCENT = 85.0
PRESSURE_CRITICAL_PERCENT = 95.0


def pressure_for(percent_used: float) -> MemoryPressure:
    if percent_used >= PRESSURE_CRITICAL_PERCENT:
        return MemoryPressure.CRITICAL
    if percent_used >= PRESSURE_WARN_PERCENT:
        return MemoryPressure.WARN
    return MemoryPressure.NORMAL


def read_system(disk_path: str = "/") -> tuple[CpuInfo, MemoryInfo, DiskInfo]:
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
