"""kvcache.measure.device_memory: never raises; explains a missing driver; v2 memory info falls back to v1."""

import os
import sys
import types
from collections import namedtuple

import pytest

from kvcache.measure import device_memory
from kvcache.measure.device_memory import read_device_memory


@pytest.fixture(autouse=True)
def _fresh_nvml(monkeypatch):
    monkeypatch.setattr(device_memory, "_nvml_ready", False)


def _has_nvidia_driver() -> bool:
    try:
        import pynvml

        pynvml.nvmlInit()
        return True
    except Exception:
        return False


@pytest.mark.skipif(_has_nvidia_driver(), reason="this machine has an NVIDIA driver; the no-driver banner can't show")
def test_without_driver_explains_and_reports_process_memory():
    r = read_device_memory()
    assert r.nvml_error and "NVIDIA" in r.nvml_error and "no GPU figures" in r.nvml_error
    assert r.gpus == []
    assert r.process_rss and r.process_rss > 10 * 2**20
    assert r.system_total and r.system_available and r.system_available <= r.system_total
    assert r.as_dict()["nvml_error"] == r.nvml_error


class _NVMLError(Exception):
    pass


class _FunctionNotFound(_NVMLError):
    pass


def _fake_pynvml(*, v2: bool, init_error: type[Exception] | None = None, my_pid: int | None = None):
    m = types.ModuleType("pynvml")
    m.NVMLError = _NVMLError
    m.NVMLError_LibraryNotFound = type("NVMLError_LibraryNotFound", (_NVMLError,), {})
    m.NVMLError_DriverNotLoaded = type("NVMLError_DriverNotLoaded", (_NVMLError,), {})
    m.NVMLError_NoPermission = type("NVMLError_NoPermission", (_NVMLError,), {})
    m.nvmlMemory_v2 = 0x2000028
    m.calls = []

    def init():
        if init_error is not None:
            raise getattr(m, init_error.__name__, init_error)()

    def get_info(handle, version=None):
        m.calls.append(version)
        if version is not None:
            if not v2:
                raise _FunctionNotFound("Function Not Found")
            return types.SimpleNamespace(total=80 * 2**30, used=10 * 2**30, free=70 * 2**30, reserved=2**29)
        return types.SimpleNamespace(total=80 * 2**30, used=11 * 2**30, free=69 * 2**30)

    proc = namedtuple("proc", "pid usedGpuMemory")
    m.nvmlInit = init
    m.nvmlSystemGetDriverVersion = lambda: b"550.54"
    m.nvmlDeviceGetCount = lambda: 1
    m.nvmlDeviceGetHandleByIndex = lambda i: ("h", i)
    m.nvmlDeviceGetName = lambda h: "NVIDIA H100"
    m.nvmlDeviceGetMemoryInfo = get_info
    m.nvmlDeviceGetComputeRunningProcesses = lambda h: [proc(123456789, 5), proc(my_pid or os.getpid(), 3 * 2**30)]
    return m


def test_v2_memory_info_is_used_when_available(monkeypatch):
    fake = _fake_pynvml(v2=True)
    monkeypatch.setitem(sys.modules, "pynvml", fake)
    r = read_device_memory()
    assert r.nvml_error is None and r.driver_version == "550.54"
    (gpu,) = r.gpus
    assert gpu.info_version == 2 and gpu.used == 10 * 2**30 and gpu.reserved == 2**29
    assert gpu.process_used == 3 * 2**30 and gpu.name == "NVIDIA H100"
    assert fake.calls == [fake.nvmlMemory_v2]


def test_falls_back_to_v1_memory_info(monkeypatch):
    fake = _fake_pynvml(v2=False)
    monkeypatch.setitem(sys.modules, "pynvml", fake)
    r = read_device_memory()
    (gpu,) = r.gpus
    assert r.nvml_error is None
    assert gpu.info_version == 1 and gpu.used == 11 * 2**30 and gpu.reserved is None
    assert fake.calls == [fake.nvmlMemory_v2, None]


def test_process_not_visible_to_nvml(monkeypatch):
    monkeypatch.setitem(sys.modules, "pynvml", _fake_pynvml(v2=True, my_pid=-1))
    assert read_device_memory().gpus[0].process_used is None


@pytest.mark.parametrize("error, words", [("NVMLError_DriverNotLoaded", "not loaded"), ("NVMLError_LibraryNotFound", "not found")])
def test_nvml_errors_become_a_message(monkeypatch, error, words):
    fake = _fake_pynvml(v2=True, init_error=type(error, (Exception,), {}))
    monkeypatch.setitem(sys.modules, "pynvml", fake)
    r = read_device_memory()
    assert r.gpus == [] and words in r.nvml_error
    assert r.process_rss


def test_broken_binding_never_raises(monkeypatch):
    fake = _fake_pynvml(v2=True)
    fake.nvmlDeviceGetCount = lambda: 1 / 0
    monkeypatch.setitem(sys.modules, "pynvml", fake)
    r = read_device_memory()
    assert r.gpus == [] and "ZeroDivisionError" in r.nvml_error


def test_missing_pynvml(monkeypatch):
    monkeypatch.setitem(sys.modules, "pynvml", None)  # import raises ImportError
    r = read_device_memory()
    assert "nvidia-ml-py" in r.nvml_error and r.process_rss
