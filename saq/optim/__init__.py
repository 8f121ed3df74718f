"""Optimizers: saq.SAQ (SAQ Cases 1-3, SAM / ASAM)."""
from .saq import SAQ

__all__ = ["SAQ"]
