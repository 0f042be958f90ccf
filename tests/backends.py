"""The kernel backends under test on this machine."""
import os

import pytest
import torch

from act_kernels.backends import cuda_extension_error

KERNEL_BACKENDS = [
    pytest.param("triton", id="triton"),
    pytest.param(
        "cuda", id="cuda",
        marks=[pytest.mark.gpu, pytest.mark.skipif(
            not torch.cuda.is_available() or bool(cuda_extension_error()),
            reason="needs a CUDA device and the built extension")],
    ),
]
if not torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1":
    raise RuntimeError("tests need a GPU or TRITON_INTERPRET=1 (set by conftest)")
