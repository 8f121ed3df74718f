"""Shared pytest setup.

* The repository root on sys.path (tests run without an install too).
* Without a GPU, Triton kernels run under its CPU interpreter, which must be switched on before
  anything imports triton (torch.compile's inductor can); setting it here, first, makes the
  Triton tests independent of the order in which test files import things.
"""
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

import torch  # noqa: E402  (importing torch does not import triton)

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
