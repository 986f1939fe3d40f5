"""NVIDIA FLARE job launcher that runs client jobs as fljob.dev FLJobs (see python/README.md).

The names below are imported on first use, so that ``python -m fljob_launcher.worker`` (the worker pod's entry
point) needs nothing but NVFlare: the launcher's own dependencies (the Kubernetes client) live in the parent.
"""

import importlib

_EXPORTS = {
    "FLJobLauncher": ".launcher",
    "FLJobHandle": ".handle",
    "TERMINAL_PHASES": ".mapping",
    "credentials_secret_name": ".mapping",
    "fljob_name": ".mapping",
    "resources_for_site": ".mapping",
    "return_code_from_status": ".mapping",
}

__all__ = list(_EXPORTS)


def __getattr__(name):
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(module, __name__), name)
    globals()[name] = value
    return value
