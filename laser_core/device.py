"""Where Laser computes: one device setting for the backbone, the frozen SR encoder, the M-Former and every batch.

The setting (``laser_train.device``, ``build_laser(device=...)``, ``load_backbone(device=...)``) is one of
``auto`` (CUDA when available, else the CPU), ``cpu``, ``cuda`` or ``cuda:N``. :func:`resolve_device` turns it into
a ``torch.device`` with an explicit index, so that it compares equal to the device parameters report: ``cuda``
(and ``auto`` on a CUDA machine) is the process's own GPU, ``cuda:$LOCAL_RANK`` under ``torchrun``/``accelerate
launch`` (one process per GPU), else the current CUDA device. The backbone's ``compute_dtype: auto`` follows the
device: bfloat16 on CUDA, float32 on the CPU.
"""

from __future__ import annotations

import os
import re

import torch

from laser_core.configuration import DEVICE_PATTERN


def resolve_device(setting: str | torch.device | None = "auto") -> torch.device:
    """The ``torch.device`` of a device setting (None: ``auto``); a CUDA device always with its index.

    Raises ValueError for an unknown setting and for a CUDA one on a machine without CUDA."""
    if isinstance(setting, torch.device):
        setting = str(setting)
    setting = "auto" if setting is None else setting
    if not re.match(DEVICE_PATTERN, setting):
        raise ValueError(f"device must be auto, cpu, cuda or cuda:N, got {setting!r}")
    if setting == "auto":
        setting = "cuda" if torch.cuda.is_available() else "cpu"
    if setting == "cpu":
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise ValueError(f"device {setting!r} asked for, but CUDA is not available here")
    if setting == "cuda":
        local = os.environ.get("LOCAL_RANK")
        return torch.device("cuda", int(local) if local is not None else torch.cuda.current_device())
    return torch.device(setting)
