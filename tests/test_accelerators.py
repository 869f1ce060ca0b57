"""Reading the accelerators on a node (herd.node.accelerators): fake nvidia-smi / rocm-smi /
sysctl executables on PATH printing what real devices print, NVML stubbed at its import seam,
and the agent's heartbeat carrying the reading."""

from __future__ import annotations

import sys
import time
import types
from pathlib import Path
from typing import Any

import attrs
import pytest
import trio
import trio.testing

from herd.core.models import BackendInfo, GpuInfo, LoadedModel
from herd.node import accelerators
from herd.node.accelerators import (
    NVIDIA_SMI_QUERY,
    ROCM_SMI_QUERY,
    AcceleratorReader,
    apple_working_set,
    parse_nvidia_smi,
    parse_rocm_smi,
    run_command,
    with_loaded,
)
from herd.node.agent import AgentConfig, NodeAgent
from herd.node.backend import BackendState

GiB = 2**30
MiB = 2**20

# Two devices as `nvidia-smi --query-gpu=... --format=csv,noheader,nounits` prints them
# (MiB, %, degrees C); the second can't give its temperature.
NVIDIA_SMI_OUTPUT = (
    "0, NVIDIA GeForce RTX 4090, 24564, 1825, 22346, 3, 41\n"
    "1, NVIDIA RTX A6000, 49140, 40210, 8484, 97, [N/A]\n"
)
NVIDIA_SMI_FAILING = (
    "NVIDIA-SMI has failed because it couldn't communicate with the NVIDIA driver. Make sure "
    "that the latest NVIDIA driver is installed and running.\n"
)
# One card as `rocm-smi --showproductname --showmeminfo vram --showuse --showtemp --json`
# prints it: every value a string.
ROCM_SMI_OUTPUT = """{"card0": {"Card Series": "Navi 31 [Radeon RX 7900 XTX]",
 "Card Model": "0x744c", "Card Vendor": "Advanced Micro Devices, Inc. [AMD/ATI]",
 "Card SKU": "EXT91851", "Temperature (Sensor edge) (C)": "43.0",
 "Temperature (Sensor junction) (C)": "47.0", "Temperature (Sensor memory) (C)": "56.0",
 "GPU use (%)": "2", "VRAM Total Memory (B)": "25753026560",
 "VRAM Total Used Memory (B)": "1327509504"}}"""


def fake_tool(directory: Path, name: str, expected_args: str, output: str, status: int = 0) -> None:
    """An executable ``name`` in ``directory`` that prints ``output`` when called with exactly
    ``expected_args`` (else fails loudly, as a real tool would refuse a bad query)."""
    (directory / f"{name}.out").write_text(output)
    script = directory / name
    script.write_text(
        "#!/bin/sh\n"
        f'if [ "$*" != "{expected_args}" ]; then echo "unexpected arguments: $*" >&2; exit 64; fi\n'
        f'cat "{directory / f"{name}.out"}"\n'
        f"exit {status}\n"
    )
    script.chmod(0o755)


@pytest.fixture
def bin_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A directory first on PATH for the fake tools; no real pynvml."""
    directory = tmp_path / "bin"
    directory.mkdir()
    monkeypatch.setenv("PATH", f"{directory}:/usr/bin:/bin")
    monkeypatch.setitem(sys.modules, "pynvml", None)  # importing it fails: not installed
    return directory


def reader(**options: Any) -> AcceleratorReader:
    options.setdefault("system", "linux")
    options.setdefault("machine", "x86_64")
    return AcceleratorReader(**options)


def test_nvidia_smi_on_path(bin_dir: Path) -> None:
    fake_tool(bin_dir, "nvidia-smi", " ".join(NVIDIA_SMI_QUERY[1:]), NVIDIA_SMI_OUTPUT)
    found = reader().read_sync(0.0)
    assert found == (
        GpuInfo(
            name="NVIDIA GeForce RTX 4090",
            memory_total_bytes=24564 * MiB,
            memory_used_bytes=1825 * MiB,
            index=0,
            vendor="nvidia",
            utilization_percent=3.0,
            temperature_c=41.0,
            source="nvidia-smi",
        ),
        GpuInfo(
            name="NVIDIA RTX A6000",
            memory_total_bytes=49140 * MiB,
            memory_used_bytes=40210 * MiB,
            index=1,
            vendor="nvidia",
            utilization_percent=97.0,
            temperature_c=None,
            source="nvidia-smi",
        ),
    )


def test_nvidia_smi_without_a_driver_is_no_accelerator(bin_dir: Path) -> None:
    fake_tool(bin_dir, "nvidia-smi", " ".join(NVIDIA_SMI_QUERY[1:]), NVIDIA_SMI_FAILING, 9)
    one = reader()
    assert one.read_sync(0.0) == () and one.source is None


def test_rocm_smi_on_path(bin_dir: Path) -> None:
    fake_tool(bin_dir, "rocm-smi", " ".join(ROCM_SMI_QUERY[1:]), ROCM_SMI_OUTPUT)
    (card,) = reader().read_sync(0.0)
    assert card == GpuInfo(
        name="Navi 31 [Radeon RX 7900 XTX]",
        memory_total_bytes=25753026560,
        memory_used_bytes=1327509504,
        index=0,
        vendor="amd",
        utilization_percent=2.0,
        temperature_c=43.0,
        source="rocm-smi",
    )


def test_odd_tool_output_is_no_device() -> None:
    assert parse_rocm_smi("not json") == () and parse_rocm_smi("[1, 2]") == ()
    assert parse_rocm_smi('{"system": {"Driver version": "6.7"}, "card0": {}}') == ()
    assert parse_nvidia_smi("No devices were found\n") == ()
    assert parse_nvidia_smi("0, broken, [N/A], [N/A], [N/A], [N/A], [N/A]\n") == ()
    # A name with commas in it keeps them.
    (odd,) = parse_nvidia_smi("2, Some, Name, 1024, 512, 512, 0, 30\n")
    assert (odd.name, odd.index, odd.memory_used_bytes) == ("Some, Name", 2, 512 * MiB)


def fake_nvml(devices: list[dict[str, Any]], *, init_error: bool = False) -> types.ModuleType:
    """A stand-in for ``pynvml`` with the calls herd makes, answering for ``devices``."""
    module = types.ModuleType("pynvml")

    class NVMLError(Exception):
        pass

    state = {"initialised": 0}

    def init() -> None:
        if init_error:
            raise NVMLError("Driver Not Loaded")
        state["initialised"] += 1

    def shutdown() -> None:
        state["initialised"] -= 1

    def device(handle: int) -> dict[str, Any]:
        assert state["initialised"] > 0, "NVML called before nvmlInit"
        return devices[handle]

    def utilization(handle: int) -> Any:
        value = device(handle)["util"]
        if value is None:
            raise NVMLError("Not Supported")
        return types.SimpleNamespace(gpu=value, memory=0)

    module.NVMLError = NVMLError  # type: ignore[attr-defined]
    module.NVML_TEMPERATURE_GPU = 0  # type: ignore[attr-defined]
    module.nvmlInit = init  # type: ignore[attr-defined]
    module.nvmlShutdown = shutdown  # type: ignore[attr-defined]
    module.nvmlDeviceGetCount = lambda: len(devices)  # type: ignore[attr-defined]
    module.nvmlDeviceGetHandleByIndex = lambda index: index  # type: ignore[attr-defined]
    module.nvmlDeviceGetName = lambda h: device(h)["name"]  # type: ignore[attr-defined]
    module.nvmlDeviceGetMemoryInfo = lambda h: types.SimpleNamespace(  # type: ignore[attr-defined]
        total=device(h)["total"],
        used=device(h)["used"],
        free=device(h)["total"] - device(h)["used"],
    )
    module.nvmlDeviceGetUtilizationRates = utilization  # type: ignore[attr-defined]
    module.nvmlDeviceGetTemperature = lambda h, sensor: device(h)["temp"]  # type: ignore[attr-defined]
    module.state = state  # type: ignore[attr-defined]
    return module


def test_nvml_stubbed_at_its_import_seam(bin_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    stub = fake_nvml(
        [
            # Older bindings answer names as bytes.
            {"name": b"NVIDIA GeForce RTX 3090", "total": 24 * GiB, "used": 3 * GiB, "util": 12,
             "temp": 55},
            {"name": "Tesla T4", "total": 15 * GiB, "used": 0, "util": None, "temp": 38},
        ]
    )  # fmt: skip
    monkeypatch.setitem(sys.modules, "pynvml", stub)
    # nvidia-smi is there too, but NVML comes first.
    fake_tool(bin_dir, "nvidia-smi", " ".join(NVIDIA_SMI_QUERY[1:]), NVIDIA_SMI_OUTPUT)
    one = reader()
    first, second = one.read_sync(0.0)
    assert one.source == "nvml" and stub.state == {"initialised": 0}  # shut down after reading
    assert (first.name, first.memory_total_bytes, first.memory_used_bytes) == (
        "NVIDIA GeForce RTX 3090",
        24 * GiB,
        3 * GiB,
    )
    assert (first.utilization_percent, first.temperature_c, first.source) == (12.0, 55.0, "nvml")
    assert (second.name, second.index, second.utilization_percent) == ("Tesla T4", 1, None)


def test_nvml_without_a_driver_falls_back_to_nvidia_smi(
    bin_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setitem(sys.modules, "pynvml", fake_nvml([], init_error=True))
    fake_tool(bin_dir, "nvidia-smi", " ".join(NVIDIA_SMI_QUERY[1:]), NVIDIA_SMI_OUTPUT)
    one = reader()
    assert len(one.read_sync(0.0)) == 2 and one.source == "nvidia-smi"


def test_no_library_no_tool_no_accelerator(bin_dir: Path) -> None:
    assert accelerators.load_nvml() is None  # pynvml can't be imported
    one = reader()
    assert one.read_sync(0.0) == () and one.source is None
    # Nothing is searched again until `rediscover` has passed.
    fake_tool(bin_dir, "nvidia-smi", " ".join(NVIDIA_SMI_QUERY[1:]), NVIDIA_SMI_OUTPUT)
    assert one.read_sync(one.rediscover - 1) == ()
    assert len(one.read_sync(one.rediscover)) == 2


def test_apple_silicon_working_set(bin_dir: Path) -> None:
    assert apple_working_set(32 * GiB) == int(32 * GiB * 2 / 3)
    assert apple_working_set(36 * GiB) == 24 * GiB
    assert apple_working_set(64 * GiB) == 48 * GiB
    assert apple_working_set(64 * GiB, 57344) == 56 * GiB  # the operator's iogpu.wired_limit_mb
    fake_tool(bin_dir, "sysctl", "-n iogpu.wired_limit_mb", "0\n")
    mac = reader(system="darwin", machine="arm64", ram_bytes=lambda: 96 * GiB)
    (device,) = mac.read_sync(0.0)
    assert (device.memory_total_bytes, device.unified, device.vendor) == (72 * GiB, True, "apple")
    assert device.utilization_percent is None and device.temperature_c is None
    # Intel Macs and other systems: no unified GPU to speak of.
    assert reader(system="darwin", machine="x86_64").read_sync(0.0) == ()


def test_a_unified_device_holds_what_the_loaded_models_hold() -> None:
    mac = GpuInfo("Apple M3 Max", 96 * GiB, vendor="apple", unified=True)
    nvidia = GpuInfo("RTX", 24 * GiB, 5 * GiB, vendor="nvidia")
    loaded = [LoadedModel("a", 10 * GiB, 10 * GiB), LoadedModel("b", 4 * GiB, 3 * GiB)]
    assert with_loaded((mac, nvidia), loaded) == (
        attrs.evolve(mac, memory_used_bytes=13 * GiB),
        nvidia,
    )


def test_a_hung_tool_is_cut_off_by_its_timeout(bin_dir: Path) -> None:
    script = bin_dir / "nvidia-smi"
    script.write_text("#!/bin/sh\nexec sleep 30\n")
    script.chmod(0o755)
    began = time.monotonic()
    assert run_command(NVIDIA_SMI_QUERY, timeout=0.3) is None
    assert time.monotonic() - began < 10


async def test_reads_run_in_a_thread_at_most_every_interval(
    bin_dir: Path, autojump_clock: trio.testing.MockClock
) -> None:
    fake_tool(bin_dir, "nvidia-smi", " ".join(NVIDIA_SMI_QUERY[1:]), NVIDIA_SMI_OUTPUT)
    threads: list[bool] = []
    real = run_command

    def run(argv: Any) -> str | None:
        threads.append(_off_loop())
        return real(argv)

    one = reader(run=run, interval=5.0)
    first = await one.read()
    assert len(first) == 2 and threads == [True]
    await trio.sleep(4.0)
    assert await one.read() is first and one.reads == 1  # cached
    await trio.sleep(1.0)
    await one.read()
    assert one.reads == 2 and all(threads)


def _off_loop() -> bool:
    """True when called from a worker thread (no Trio run here)."""
    try:
        trio.lowlevel.current_trio_token()
    except RuntimeError:
        return True
    return False


async def test_the_heartbeat_carries_the_reading() -> None:
    readings = 0

    async def read() -> tuple[GpuInfo, ...]:
        nonlocal readings
        readings += 1
        return (GpuInfo("Apple M2 Ultra", 144 * GiB, vendor="apple", unified=True),)

    agent = NodeAgent(AgentConfig(router_url="http://127.0.0.1:1"), accelerators=read)
    state = BackendState(BackendInfo(healthy=True), loaded=(LoadedModel("m", 40 * GiB, 40 * GiB),))
    report = agent.build_report(state, time.time(), await read())
    (device,) = report.gpus
    assert device.memory_used_bytes == 40 * GiB and readings == 1
    assert NodeAgent(AgentConfig(router_url="http://127.0.0.1:1")).accelerators is None
