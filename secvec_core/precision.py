"""Dtype choices that are right on a CPU (float32 everywhere) and on a GPU (bfloat16 where it is safe).

- Weights: a frozen base (LoRA mode) loads in bfloat16 on a GPU: half the memory, and it never receives
  an update that bfloat16 could round away. Trained base weights (full mode) stay float32 master weights;
  FSDP computes in bfloat16 (see :mod:`secvec_core.distributed`). Adapters are float32 (peft upcasts them).
- Compute: ``torch.autocast`` in bfloat16 on a GPU; off on a CPU, where bfloat16 matmuls are slow and
  the tests need float32 results.
"""

from __future__ import annotations

import contextlib

import torch

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


def weights_dtype(setting: str, device_type: str, *, full_weights: bool) -> torch.dtype:
    """The dtype to load the model in for ``TrainingConfig.dtype``."""
    if setting == "auto":
        return torch.bfloat16 if device_type == "cuda" and not full_weights else torch.float32
    if setting not in DTYPES:
        raise ValueError(f"dtype must be one of {['auto', *DTYPES]}, got {setting!r}")
    return DTYPES[setting]


def bf16_compute(setting: str, device_type: str) -> bool:
    """Whether ``TrainingConfig.mixed_precision`` asks for bfloat16 autocast on this device."""
    if setting == "auto":
        return device_type == "cuda"
    if setting not in ("no", "bf16"):
        raise ValueError(f"mixed_precision must be 'auto', 'no' or 'bf16', got {setting!r}")
    return setting == "bf16"


def autocast(enabled: bool, device_type: str):
    """bfloat16 autocast on ``device_type`` when ``enabled``; a no-op context otherwise."""
    if not enabled:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device_type, dtype=torch.bfloat16)
