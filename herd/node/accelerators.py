"""This machine's accelerators, read for the heartbeat: per device its name, memory,
utilisation and temperature (:class:`~herd.core.models.GpuInfo`).

Sources, tried in this order; the first that finds a device is the one read from then on:

1. **NVML** through ``pynvml``, from the optional package ``nvidia-ml-py`` (``pip install
   '.[nvidia]'``). Importing it needs no driver; without one ``nvmlInit`` fails, which reads as
   "no NVIDIA GPU".
2. **nvidia-smi** (it comes with the driver): ``nvidia-smi --query-gpu=index,name,
   memory.total,memory.used,memory.free,utilization.gpu,temperature.gpu
   --format=csv,noheader,nounits``, one line per device, memory in MiB; a value the device
   can't give (``[N/A]``, ``[Not Supported]``) is read as unknown.
3. **rocm-smi** (AMD): ``rocm-smi --showproductname --showmeminfo vram --showuse --showtemp
   --json``: one object per card (``card0``, ...) whose values are strings: ``VRAM Total
   Memory (B)``, ``VRAM Total Used Memory (B)``, ``GPU use (%)``, ``Temperature (Sensor edge)
   (C)`` (else the junction sensor) and the card's series for its name.
4. **Apple silicon** (macOS on arm64): unified memory. The GPU may use system RAM up to Metal's
   ``recommendedMaxWorkingSetSize``, which only Metal can be asked for; herd reads, without
   Metal, ``sysctl -n iogpu.wired_limit_mb`` (the limit an operator set, if above 0) and
   otherwise applies the rule Metal follows (:func:`apple_working_set`): two thirds of RAM up
   to 36 GiB, three quarters above. What the device holds is what Ollama's loaded models hold
   of it (:func:`with_loaded`, from their ``size_vram``); utilisation and temperature need root
   (``powermetrics``) and are left unknown.

Nothing found: no accelerator, and the router judges the node by its RAM, as for a CPU-only
machine. A source that stops answering (a driver reset) reads as no device until it answers
again; with nothing found, the search runs again every ``rediscover`` seconds.

Reading never runs on the event loop: :meth:`AcceleratorReader.read` reads in a worker thread
(``trio.to_thread.run_sync``), at most every ``interval`` seconds, and hands back the last
reading in between, so heartbeats don't wait on a device. Every command runs with a timeout
(:data:`COMMAND_TIMEOUT`) and its failure is "no reading", never an exception.
"""

from __future__ import annotations

import importlib
import json
import logging
import math
import platform
import shutil
import subprocess
import sys
from collections.abc import Callable, Sequence
from typing import Any

import attrs
import psutil
import trio

from herd.core.memory import MAX_DEVICES
from herd.core.models import GpuInfo, LoadedModel

log = logging.getLogger("herd.node")

GiB = 2**30
MiB = 2**20
COMMAND_TIMEOUT = 3.0  # seconds for one nvidia-smi / rocm-smi / sysctl run
READ_INTERVAL = 5.0  # read devices at most this often
REDISCOVER = 300.0  # with no device found, look again this often
NVIDIA_SMI_QUERY = (
    "nvidia-smi",
    "--query-gpu=index,name,memory.total,memory.used,memory.free,utilization.gpu,temperature.gpu",
    "--format=csv,noheader,nounits",
)
ROCM_SMI_QUERY = (
    "rocm-smi",
    "--showproductname",
    "--showmeminfo",
    "vram",
    "--showuse",
    "--showtemp",
    "--json",
)
APPLE_SMALL_RAM = 36 * GiB  # up to this much RAM Metal's working set is 2/3 of it, above 3/4

Runner = Callable[[Sequence[str]], str | None]


def run_command(argv: Sequence[str], timeout: float = COMMAND_TIMEOUT) -> str | None:
    """``argv``'s standard output, or None if the program isn't on PATH, can't start or runs
    past ``timeout``. The exit status is not judged here: the parsers read what there is (a
    failing nvidia-smi prints one line of prose, which parses as no device). Blocking: call
    it from a worker thread."""
    program = shutil.which(argv[0])
    if program is None:
        return None
    try:
        done = subprocess.run(
            [program, *argv[1:]],
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
            stdin=subprocess.DEVNULL,
        )
    except (OSError, subprocess.SubprocessError, ValueError):
        return None
    return done.stdout


def _number(text: object) -> float | None:
    """A finite number from a device tool's field, or None ("[N/A]", "[Not Supported]", "")."""
    if isinstance(text, list):  # some rocm-smi versions list a value per sample
        text = text[0] if text else None
    if isinstance(text, bool) or text is None:
        return None
    try:
        value = float(str(text).strip())
    except ValueError:
        return None
    return value if math.isfinite(value) else None


def parse_nvidia_smi(text: str) -> tuple[GpuInfo, ...]:
    """The devices in ``nvidia-smi --query-gpu=index,name,memory.total,memory.used,
    memory.free,utilization.gpu,temperature.gpu --format=csv,noheader,nounits`` output.
    Lines that aren't such a record are skipped."""
    out = []
    for line in text.splitlines():
        fields = [f.strip() for f in line.split(",")]
        if len(fields) < 7:
            continue
        # A name with commas in it: everything between the index and the last five fields.
        index, name, rest = fields[0], ", ".join(fields[1:-5]), fields[-5:]
        position = _number(index)
        total, used, free, busy, temperature = (_number(v) for v in rest)
        if position is None or total is None or total <= 0:
            continue
        if used is None and free is not None:
            used = total - free
        out.append(
            GpuInfo(
                name=name,
                memory_total_bytes=int(total * MiB),
                memory_used_bytes=int(max(0.0, min(total, used or 0.0)) * MiB),
                index=int(position),
                vendor="nvidia",
                utilization_percent=busy,
                temperature_c=temperature,
                source="nvidia-smi",
            )
        )
    return tuple(out[:MAX_DEVICES])


def _field(card: dict[str, Any], *names: str) -> Any:
    """The first of ``names`` in ``card``, matched without regard to case (rocm-smi's
    capitalisation changed between versions)."""
    lowered = {str(k).lower(): v for k, v in card.items()}
    for name in names:
        if name.lower() in lowered:
            return lowered[name.lower()]
    return None


def parse_rocm_smi(text: str) -> tuple[GpuInfo, ...]:
    """The devices in ``rocm-smi --showproductname --showmeminfo vram --showuse --showtemp
    --json`` output. Cards without a VRAM total are skipped; anything but JSON is no device."""
    try:
        data = json.loads(text)
    except ValueError:
        return ()
    if not isinstance(data, dict):
        return ()
    out = []
    for key, card in data.items():
        if not (isinstance(key, str) and key.startswith("card") and key[4:].isdigit()):
            continue
        if not isinstance(card, dict):
            continue
        total = _number(_field(card, "VRAM Total Memory (B)"))
        if total is None or total <= 0:
            continue
        used = _number(_field(card, "VRAM Total Used Memory (B)")) or 0.0
        temperature = _number(_field(card, "Temperature (Sensor edge) (C)"))
        if temperature is None:
            temperature = _number(_field(card, "Temperature (Sensor junction) (C)"))
        name = _field(card, "Card Series", "Card series", "Device Name", "Card Model")
        out.append(
            GpuInfo(
                name=str(name).strip() if name else "AMD GPU",
                memory_total_bytes=int(total),
                memory_used_bytes=int(max(0.0, min(total, used))),
                index=int(key[4:]),
                vendor="amd",
                utilization_percent=_number(_field(card, "GPU use (%)")),
                temperature_c=temperature,
                source="rocm-smi",
            )
        )
    out.sort(key=lambda g: g.index)
    return tuple(out[:MAX_DEVICES])


def apple_working_set(ram_bytes: int, wired_limit_mb: int | None = None) -> int:
    """The GPU's share of unified memory: ``iogpu.wired_limit_mb`` when an operator set it
    (above 0), else Metal's rule: 2/3 of RAM up to :data:`APPLE_SMALL_RAM`, 3/4 above."""
    if wired_limit_mb is not None and wired_limit_mb > 0:
        return min(ram_bytes, wired_limit_mb * MiB)
    share = 2 / 3 if ram_bytes <= APPLE_SMALL_RAM else 3 / 4
    return int(ram_bytes * share)


def load_nvml() -> Any | None:
    """The ``pynvml`` module (package ``nvidia-ml-py``), or None if it isn't installed: the
    seam tests stub."""
    try:
        return importlib.import_module("pynvml")
    except ImportError:
        return None


def read_nvml(nvml: Any) -> tuple[GpuInfo, ...]:
    """Every NVIDIA device through NVML (``nvml``: the ``pynvml`` module). Raises whatever
    NVML raises (``NVMLError`` without a driver): the caller reads that as no device."""
    nvml.nvmlInit()
    try:
        out = []
        for index in range(min(MAX_DEVICES, int(nvml.nvmlDeviceGetCount()))):
            handle = nvml.nvmlDeviceGetHandleByIndex(index)
            name = nvml.nvmlDeviceGetName(handle)
            if isinstance(name, bytes):  # older bindings answer bytes
                name = name.decode("utf-8", "replace")
            memory = nvml.nvmlDeviceGetMemoryInfo(handle)
            try:
                busy: float | None = float(nvml.nvmlDeviceGetUtilizationRates(handle).gpu)
            except nvml.NVMLError:
                busy = None  # "not supported" on some devices
            try:
                temperature: float | None = float(
                    nvml.nvmlDeviceGetTemperature(handle, nvml.NVML_TEMPERATURE_GPU)
                )
            except nvml.NVMLError:
                temperature = None
            total = int(memory.total)
            out.append(
                GpuInfo(
                    name=str(name),
                    memory_total_bytes=total,
                    memory_used_bytes=max(0, min(total, int(memory.used))),
                    index=index,
                    vendor="nvidia",
                    utilization_percent=busy,
                    temperature_c=temperature,
                    source="nvml",
                )
            )
        return tuple(g for g in out if g.memory_total_bytes > 0)
    finally:
        nvml.nvmlShutdown()


def with_loaded(gpus: tuple[GpuInfo, ...], loaded: Sequence[LoadedModel]) -> tuple[GpuInfo, ...]:
    """Unified-memory devices (whose use can't be read without Metal) with what Ollama's loaded
    models hold of them (their ``size_vram``, summed); other devices as they are."""
    if not any(g.unified for g in gpus):
        return gpus
    held = sum(max(0, m.vram_bytes) for m in loaded)
    return tuple(
        attrs.evolve(g, memory_used_bytes=min(g.memory_total_bytes, held)) if g.unified else g
        for g in gpus
    )


@attrs.define(eq=False)
class AcceleratorReader:
    """The machine's devices, read off the event loop and cached; see the module docstring.
    The seams (``run``, ``nvml``, ``system``, ``machine``, ``ram_bytes``) let tests stand in
    for the tools, the library and the platform."""

    interval: float = READ_INTERVAL
    rediscover: float = REDISCOVER
    run: Runner = run_command
    nvml: Callable[[], Any | None] = load_nvml
    system: str = sys.platform
    machine: str = attrs.field(factory=platform.machine)
    ram_bytes: Callable[[], int] = lambda: int(psutil.virtual_memory().total)
    reads: int = 0  # readings taken (not counting cached answers)
    source: str | None = attrs.field(default=None, init=False)  # the source in use
    _last: tuple[GpuInfo, ...] = attrs.field(default=(), init=False)
    _read_at: float = attrs.field(default=-math.inf, init=False)
    _searched_at: float = attrs.field(default=-math.inf, init=False)
    _errors: set[str] = attrs.field(factory=set, init=False)  # logged once each

    async def read(self) -> tuple[GpuInfo, ...]:
        """The devices, read at most every ``interval`` seconds (in a worker thread); the
        last reading in between. Never raises for a device's sake."""
        now = trio.current_time()
        if now - self._read_at >= self.interval:
            self._read_at = now
            self._last = await trio.to_thread.run_sync(self.read_sync, now)
        return self._last

    def read_sync(self, now: float) -> tuple[GpuInfo, ...]:
        """One reading (blocking; ``now`` is the caller's clock, for the search interval)."""
        self.reads += 1
        if self.source is not None:
            found = self._read(self.source)
            if found:
                return found
        if now - self._searched_at < self.rediscover:
            return ()
        self._searched_at = now
        for source in ("nvml", "nvidia-smi", "rocm-smi", "apple"):
            found = self._read(source)
            if found:
                if source != self.source:
                    log.info(
                        "accelerators (%s): %s",
                        source,
                        ", ".join(
                            f"{g.name} {g.memory_total_bytes / GiB:.1f} GiB"
                            + (" (unified)" if g.unified else "")
                            for g in found
                        ),
                    )
                self.source = source
                return found
        if self.source is None and not self._errors:
            log.info("no accelerator found (NVML, nvidia-smi, rocm-smi, Apple): judged by RAM")
            self._errors.add("none")
        return ()

    def _read(self, source: str) -> tuple[GpuInfo, ...]:
        try:
            if source == "nvml":
                nvml = self.nvml()
                return read_nvml(nvml) if nvml is not None else ()
            if source == "nvidia-smi":
                text = self.run(NVIDIA_SMI_QUERY)
                return parse_nvidia_smi(text) if text else ()
            if source == "rocm-smi":
                text = self.run(ROCM_SMI_QUERY)
                return parse_rocm_smi(text) if text else ()
            return self._apple()
        except Exception as exc:  # a device library's own error (NVMLError, ...): no reading
            reason = f"{source}: {type(exc).__name__}: {exc}"
            if reason not in self._errors:
                self._errors.add(reason)
                log.debug("accelerator reading failed (%s)", reason)
            return ()

    def _apple(self) -> tuple[GpuInfo, ...]:
        if self.system != "darwin" or self.machine != "arm64":
            return ()
        ram = self.ram_bytes()
        limit = _number(self.run(("sysctl", "-n", "iogpu.wired_limit_mb")))
        brand = (self.run(("sysctl", "-n", "machdep.cpu.brand_string")) or "").strip()
        return (
            GpuInfo(
                name=brand or "Apple silicon",
                memory_total_bytes=apple_working_set(ram, int(limit) if limit else None),
                vendor="apple",
                unified=True,
                source="apple",
            ),
        )
