"""GPU-only: large shapes and the kernel backends against each other.
Skipped (never passed) without a CUDA device."""
import pytest
import torch

from backends import KERNEL_BACKENDS
from test_backends import compare

pytestmark = pytest.mark.gpu


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("batch,hidden", [(4096, 1024), (1024, 4100), (64, 8192), (8192, 96)])
def test_large_shapes(backend, dtype, batch, hidden):
    compare(backend, batch, hidden, dtype, -2.0, 12)
