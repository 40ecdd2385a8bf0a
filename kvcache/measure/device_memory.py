"""What memory the device and this process hold right now: NVML, torch's allocator, process RSS.

``read_device_memory()`` never raises. Without an NVIDIA driver (NVML library not found, driver not
loaded) it says why in ``nvml_error`` and still reports the process memory; the caller adds the
exact KV bytes it owns. NVML is asked for v2 memory info (which splits out driver-reserved memory)
and falls back to v1 on drivers that predate it.
"""

from __future__ import annotations

import os
import threading
import time
from dataclasses import asdict, dataclass, field
from typing import Any

_NVML_LOCK = threading.Lock()
_nvml_ready = False


@dataclass
class GPUMemory:
    """One device as NVML sees it (bytes)."""

    index: int
    name: str
    total: int
    used: int
    free: int
    reserved: int | None = None  # driver/firmware reserve, v2 memory info only
    process_used: int | None = None  # this process, when NVML can see it (not inside some containers)
    info_version: int = 2


@dataclass
class TorchMemory:
    """torch's CUDA caching allocator on one device (bytes)."""

    device: int
    allocated: int
    reserved: int
    max_allocated: int


@dataclass
class MemoryReading:
    timestamp: float
    nvml_error: str | None = None  # why there are no device figures (None when NVML answered)
    driver_version: str | None = None
    gpus: list[GPUMemory] = field(default_factory=list)
    torch_cuda: TorchMemory | None = None  # None unless this process has initialised CUDA
    process_rss: int | None = None
    system_total: int | None = None
    system_available: int | None = None

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def _nvml_message(exc: BaseException) -> str:
    """A sentence a person understands, for each way NVML can be unavailable."""
    import pynvml

    if isinstance(exc, pynvml.NVMLError_LibraryNotFound):
        return "No NVIDIA driver: the NVML library (libnvidia-ml.so) was not found, so there are no GPU figures."
    if isinstance(exc, pynvml.NVMLError_DriverNotLoaded):
        return "The NVIDIA driver is not loaded, so there are no GPU figures."
    if isinstance(exc, pynvml.NVMLError_NoPermission):
        return "NVML refused access (no permission), so there are no GPU figures."
    return f"NVML is unavailable ({exc}), so there are no GPU figures."


def _ensure_nvml() -> None:
    global _nvml_ready
    import pynvml

    with _NVML_LOCK:
        if not _nvml_ready:
            pynvml.nvmlInit()
            _nvml_ready = True


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def _memory_info(pynvml: Any, handle: Any) -> tuple[Any, int]:
    """v2 memory info (has ``reserved``) where the driver has it, else v1."""
    version = getattr(pynvml, "nvmlMemory_v2", None)
    if version is not None:
        try:
            return pynvml.nvmlDeviceGetMemoryInfo(handle, version=version), 2
        except (pynvml.NVMLError, TypeError, AttributeError):
            pass  # old driver (function not found / not supported) or old bindings
    return pynvml.nvmlDeviceGetMemoryInfo(handle), 1


def _process_used(pynvml: Any, handle: Any, pid: int) -> int | None:
    try:
        procs = pynvml.nvmlDeviceGetComputeRunningProcesses(handle)
    except pynvml.NVMLError:
        return None
    used = [p.usedGpuMemory for p in procs if p.pid == pid and isinstance(p.usedGpuMemory, int)]
    return sum(used) if used else None


def _read_nvml(reading: MemoryReading) -> None:
    try:
        import pynvml
    except ImportError:
        reading.nvml_error = "pynvml is not installed (pip install nvidia-ml-py), so there are no GPU figures."
        return
    try:
        _ensure_nvml()
        try:
            reading.driver_version = _text(pynvml.nvmlSystemGetDriverVersion())
        except pynvml.NVMLError:
            pass
        pid = os.getpid()
        for i in range(pynvml.nvmlDeviceGetCount()):
            handle = pynvml.nvmlDeviceGetHandleByIndex(i)
            info, version = _memory_info(pynvml, handle)
            try:
                name = _text(pynvml.nvmlDeviceGetName(handle))
            except pynvml.NVMLError:
                name = f"GPU {i}"
            reading.gpus.append(GPUMemory(
                index=i, name=name, total=int(info.total), used=int(info.used), free=int(info.free),
                reserved=int(info.reserved) if version == 2 else None,
                process_used=_process_used(pynvml, handle, pid), info_version=version,
            ))
    except pynvml.NVMLError as exc:
        reading.gpus = []
        reading.nvml_error = _nvml_message(exc)
    except Exception as exc:  # a broken binding must not take the page down
        reading.gpus = []
        reading.nvml_error = f"NVML could not be read ({type(exc).__name__}: {exc}), so there are no GPU figures."


def _read_torch(reading: MemoryReading) -> None:
    try:
        import torch

        if torch.cuda.is_available() and torch.cuda.is_initialized():  # never create a context just to look
            dev = torch.cuda.current_device()
            reading.torch_cuda = TorchMemory(
                device=dev,
                allocated=torch.cuda.memory_allocated(dev),
                reserved=torch.cuda.memory_reserved(dev),
                max_allocated=torch.cuda.max_memory_allocated(dev),
            )
    except Exception:
        reading.torch_cuda = None


def _read_process(reading: MemoryReading) -> None:
    try:
        import psutil

        reading.process_rss = psutil.Process().memory_info().rss
        vm = psutil.virtual_memory()
        reading.system_total, reading.system_available = vm.total, vm.available
        return
    except Exception:
        pass
    try:  # Linux without psutil
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    reading.process_rss = int(line.split()[1]) * 1024
        with open("/proc/meminfo") as f:
            info = {line.split(":")[0]: int(line.split()[1]) * 1024 for line in f if line.split()[1:2]}
        reading.system_total, reading.system_available = info.get("MemTotal"), info.get("MemAvailable")
    except Exception:
        pass


def read_device_memory() -> MemoryReading:
    """Device memory (NVML), torch's allocator and this process's RSS, now. Never raises."""
    reading = MemoryReading(timestamp=time.time())
    _read_nvml(reading)
    _read_torch(reading)
    _read_process(reading)
    return reading
