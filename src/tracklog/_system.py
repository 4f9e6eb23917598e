"""System metrics, sampled by the delivery process with psutil.

Every ``system_metrics`` seconds while the trainer runs: the machine's CPU and memory
use, the trainer's own RSS and CPU, disk use and I/O, network I/O, and with
nvidia-ml-py (the ``gpu`` extra) on a machine with NVIDIA GPUs each GPU's utilisation,
memory and power and the trainer's memory on it, under the names MLflow's own sampler
uses (``system/cpu_utilization_percentage``, …), so MLflow's
System metrics tab shows them. A sample is a :class:`~tracklog._row.Row` whose step
counts the samples, as MLflow's sampler counts them. Sampling runs in the delivery
process, not on the training thread; W&B samples its own (of the trainer's pid).
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable
from pathlib import Path
from typing import Final, cast

import psutil

from tracklog._row import Row
from tracklog.values import LogValue, Scalar

__all__ = ["PREFIX", "SystemSampler"]

PREFIX: Final = "system/"
_MB: Final = 1e6
_Percent = Callable[[float | None], float]  # cpu_percent(interval), which psutil leaves untyped


def _machine_cpu() -> float:
    return cast("_Percent", psutil.cpu_percent)(None)  # pyright: ignore[reportUnknownMemberType]  # psutil's stubs leave `interval` untyped


def _process_cpu(process: psutil.Process) -> float:
    return cast("_Percent", process.cpu_percent)(None)  # pyright: ignore[reportUnknownMemberType]  # psutil's stubs leave `interval` untyped


class _Gpus:
    """The machine's NVIDIA GPUs through NVML: none without nvidia-ml-py, without the
    driver's library, or without a GPU. A reading NVML refuses (power on some boards)
    is left out of the sample."""

    def __init__(self, pid: int) -> None:
        self._pid = pid
        self._handles: list[object] = []
        try:
            import pynvml
        except ImportError:
            return
        try:
            pynvml.nvmlInit()
            count = pynvml.nvmlDeviceGetCount()
            self._handles = [pynvml.nvmlDeviceGetHandleByIndex(i) for i in range(count)]
        except pynvml.NVMLError:  # no driver library (NVMLError_LibraryNotFound), no GPU
            self._handles = []

    def __len__(self) -> int:
        return len(self._handles)

    def sample(self) -> dict[str, float]:
        import pynvml

        values: dict[str, float] = {}
        for i, handle in enumerate(self._handles):
            name = f"gpu_{i}_"
            with contextlib.suppress(pynvml.NVMLError):
                memory = pynvml.nvmlDeviceGetMemoryInfo(handle)
                values[name + "memory_usage_percentage"] = memory.used / memory.total * 100
                values[name + "memory_usage_megabytes"] = memory.used / _MB
            with contextlib.suppress(pynvml.NVMLError):
                utilization = pynvml.nvmlDeviceGetUtilizationRates(handle)
                values[name + "utilization_percentage"] = float(utilization.gpu)
            with contextlib.suppress(pynvml.NVMLError, ZeroDivisionError):
                milliwatts = pynvml.nvmlDeviceGetPowerUsage(handle)
                values[name + "power_usage_watts"] = milliwatts / 1000
                limit = pynvml.nvmlDeviceGetEnforcedPowerLimit(handle)
                values[name + "power_usage_percentage"] = milliwatts / limit * 100
            with contextlib.suppress(pynvml.NVMLError):
                used = sum(
                    process.usedGpuMemory or 0
                    for process in pynvml.nvmlDeviceGetComputeRunningProcesses(handle)
                    if process.pid == self._pid
                )
                values[name + "trainer_memory_megabytes"] = used / _MB
        return values


class SystemSampler:
    """Samples the machine and the process ``pid`` (the trainer)."""

    def __init__(self, pid: int, disk: Path) -> None:
        self._process: psutil.Process | None
        try:
            self._process = psutil.Process(pid)
            _process_cpu(self._process)  # the first call only starts the count
        except psutil.Error:
            self._process = None
        self._disk = disk
        self._gpus = _Gpus(pid)
        _machine_cpu()
        self._io = psutil.disk_io_counters()
        self._net = psutil.net_io_counters()
        self.count = 0

    def sample(self) -> Row:
        memory = psutil.virtual_memory()
        values: dict[str, float] = {
            "cpu_utilization_percentage": _machine_cpu(),
            "system_memory_usage_megabytes": memory.used / _MB,
            "system_memory_usage_percentage": memory.used / memory.total * 100,
        }
        try:
            usage = psutil.disk_usage(str(self._disk))
            values["disk_usage_percentage"] = usage.used / usage.total * 100
            values["disk_usage_megabytes"] = usage.used / _MB
            values["disk_available_megabytes"] = usage.free / _MB
        except OSError:
            pass
        io = psutil.disk_io_counters()
        if io is not None and self._io is not None:
            values["disk_read_megabytes"] = (io.read_bytes - self._io.read_bytes) / _MB
            values["disk_write_megabytes"] = (io.write_bytes - self._io.write_bytes) / _MB
        net = psutil.net_io_counters()
        if net and self._net:  # None on a machine without network counters
            values["network_receive_megabytes"] = (net.bytes_recv - self._net.bytes_recv) / _MB
            values["network_transmit_megabytes"] = (net.bytes_sent - self._net.bytes_sent) / _MB
        if self._process is not None:
            try:
                with self._process.oneshot():
                    values["trainer_rss_megabytes"] = self._process.memory_info().rss / _MB
                    values["trainer_cpu_percentage"] = _process_cpu(self._process)
            except psutil.Error:  # the trainer is gone
                self._process = None
        if self._gpus:
            values.update(self._gpus.sample())
        sample: dict[str, LogValue] = {
            PREFIX + name: Scalar(float(value)) for name, value in values.items()
        }
        # A seq of its own (negative: never a dump's), as outputs key work by seq.
        row = Row(step=self.count, timestamp=time.time(), seq=-1 - self.count, values=sample)
        self.count += 1
        return row
