"""KV-cache calibration (LMDeploy's ``lite calibrate``, offline): observers, calibration data, the
layer-by-layer statistics run, the work dir it writes, and the exports. Never imports gradio.

Rooms: ``calibrate`` (the pipeline), ``layerwise`` (one decoder layer at a time, with observers),
``memory`` (what fits, and the message when it does not), ``workdir`` (the work dir's writer and
reader), ``observers``, ``data/``, ``export/`` (one file per format), ``errors``, ``cli``.

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
    "check_dataset": "data",
    "VALID_DATASETS": "data",
    "ObservingCache": "layerwise",
    "check_inputs": "calibrate",
    "CalibError": "errors",
    "CalibDataError": "errors",
    "CalibCancelled": "errors",
    "CalibOOMError": "errors",
    "CalibNaNError": "errors",
    "CalibStatsError": "errors",
    "ExportError": "errors",
    "UsageError": "errors",
    "WORK_DIR_FILES": "workdir",
    "load_work_dir": "workdir",
    "check_model": "workdir",
    "CalibStats": "workdir",
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
