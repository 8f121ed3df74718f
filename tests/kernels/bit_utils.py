"""Helpers for the kernel tests (imported by name: pytest puts this folder on sys.path)."""
from __future__ import annotations

import torch


def as_bits(t: torch.Tensor) -> torch.Tensor:
    """The tensor's bits as integers: equality that tells -0.0 from 0.0 and compares NaNs."""
    ity = {8: torch.int64, 4: torch.int32, 2: torch.int16}[t.element_size()]
    return t.contiguous().view(ity)
