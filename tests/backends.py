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

# The CPU gate kernels of the compiled extension (act_kernels.ops.cells.cpu_kernels):
# CPU tensors of float32 or float64; the tests run them where the suite runs on the CPU.
CPU_GATES = pytest.param(
    "cpu", id="cpu",
    marks=pytest.mark.skipif(torch.cuda.is_available() or bool(cuda_extension_error()),
                             reason="CPU rows: a CPU test run with the extension built"),
)
CPU_DTYPES = (torch.float32, torch.float64)
