"""Test-session set-up shared by every test module.

Triton kernels run in Triton's interpreter on a machine without CUDA, which must be switched on
before anything imports ``triton`` (Lightning and torch.compile do): so it is set here, first.
"""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
