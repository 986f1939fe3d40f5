"""NVIDIA FLARE job launcher that runs client jobs as fljob.dev FLJobs (see python/README.md)."""

from .handle import FLJobHandle
from .launcher import FLJobLauncher
from .mapping import (
    TERMINAL_PHASES,
    credentials_secret_name,
    fljob_name,
    resources_for_site,
    return_code_from_status,
)

__all__ = [
    "FLJobLauncher",
    "FLJobHandle",
    "TERMINAL_PHASES",
    "credentials_secret_name",
    "fljob_name",
    "resources_for_site",
    "return_code_from_status",
]
