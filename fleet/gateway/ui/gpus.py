"""The machine's GPUs as the status page shows them, read through NVML (nvidia-ml-py): name,
memory used of total, utilization, processes, and which of the fleet's engines were given each.

Without NVIDIA's driver (a CPU machine) NVML does not start: then there is no GPU, and the page
shows no GPU table. NVML is tried again a minute later (a driver may come back after an upgrade).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING

import msgspec

if TYPE_CHECKING:
    from fleet.gateway.control import Control

log = logging.getLogger("fleet.gateway")
RETRY_AFTER = 60.0


class Gpu(msgspec.Struct):
    index: int
    name: str
    memory_used: int  # bytes
    memory_total: int
    utilization: int  # percent of the last sample period with a kernel running
    processes: int  # compute processes on it (any, not only the fleet's)
    engines: list[str]  # the fleet's engines given this GPU (CUDA_VISIBLE_DEVICES)


def engines_on_gpus(control: Control | None) -> dict[int, list[str]]:
    """Which of this machine's GPUs each engine was given (a cluster's engines are on their nodes: none)."""
    on: dict[int, list[str]] = {}
    if control is not None:
        for row in control.status().models:
            if row.node is None and row.url is None:
                for gpu in row.gpus:
                    on.setdefault(gpu, []).append(row.replica)
    return on


class Gpus:
    """Reads every GPU once per call; `read` never raises (no NVML: no GPU)."""

    def __init__(self, engines_on: Callable[[], Mapping[int, list[str]]] = dict) -> None:
        self.engines_on = engines_on
        self._started = False
        self._failed_at: float | None = None

    def _start(self) -> bool:
        if self._started:
            return True
        if self._failed_at is not None and time.monotonic() - self._failed_at < RETRY_AFTER:
            return False
        try:
            import pynvml  # nvidia-ml-py: ctypes over libnvidia-ml.so, loaded only here

            pynvml.nvmlInit()
        except Exception as e:  # NVMLError_LibraryNotFound, DriverNotLoaded, ...: no GPU here
            if self._failed_at is None:
                log.info("no GPUs for the status page: NVML did not start (%s)", e)
            self._failed_at = time.monotonic()
            return False
        self._started = True
        return True

    def read(self) -> list[Gpu]:
        """Every GPU now (blocking: NVML calls take ~1 ms each; call it from a thread)."""
        if not self._start():
            return []
        import pynvml

        engines = self.engines_on()
        try:
            out = []
            for i in range(pynvml.nvmlDeviceGetCount()):
                handle = pynvml.nvmlDeviceGetHandleByIndex(i)
                memory = pynvml.nvmlDeviceGetMemoryInfo(handle)
                name = pynvml.nvmlDeviceGetName(handle)
                out.append(Gpu(
                    index=i,
                    name=name.decode() if isinstance(name, bytes) else str(name),
                    memory_used=int(memory.used),
                    memory_total=int(memory.total),
                    utilization=int(pynvml.nvmlDeviceGetUtilizationRates(handle).gpu),
                    processes=len(pynvml.nvmlDeviceGetComputeRunningProcesses(handle)),
                    engines=sorted(engines.get(i, [])),
                ))
            return out
        except Exception as e:  # a GPU that fell off the bus, a driver reload: say so once, try later
            log.warning("reading GPUs through NVML failed: %s", e)
            self._started, self._failed_at = False, time.monotonic()
            return []
