"""KV-cache calibration (LMDeploy's ``lite calibrate``, offline): observers, calibration data, the
layer-by-layer statistics run, and the work dir it writes. Never imports gradio.

Names are imported lazily, so ``python -m calib kv_qparams`` does not pay for what it does not use.
The calibration function itself is ``calib.calibrate.calibrate``: it is not re-exported here, because a
package attribute named ``calibrate`` would shadow the ``calib.calibrate`` module.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "KVObserver": "observers",
    "ActivationObserver": "observers",
    "load_calib_windows": "data",
    "CalibDataError": "data",
    "CalibCancelled": "data",
    "VALID_DATASETS": "data",
    "ObservingCache": "calibrate",
    "CalibError": "calibrate",
    "CalibOOMError": "calibrate",
    "CalibNaNError": "calibrate",
    "WORK_DIR_FILES": "calibrate",
    "load_work_dir": "stats_io",
    "check_model": "stats_io",
    "CalibStats": "stats_io",
    "CalibStatsError": "stats_io",
    "lmdeploy_equivalent": "lmdeploy",
    "LMDeployEquivalent": "lmdeploy",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'calib' has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{module}", __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
