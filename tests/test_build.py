"""The CUDA extension builds wherever nvcc is present (no GPU needed) and imports."""
import importlib
import os

import pytest

from act_kernels.backends import cuda_extension_error


def _nvcc_present():
    import shutil
    from pathlib import Path
    for home in (os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH"), "/usr/local/cuda"):
        if home and (Path(home) / "bin" / "nvcc").exists():
            return True
    return shutil.which("nvcc") is not None


@pytest.mark.skipif(not _nvcc_present() or os.environ.get("ACT_KERNELS_CUDA") == "0",
                    reason="nvcc absent or the build disabled: the extension is skipped by design")
def test_extension_built_and_imports():
    assert cuda_extension_error() == ""
    ext = importlib.import_module("act_kernels._C")
    for name in ("halting_step", "combine_backward", "combine_backward_groups", "pondernet_step",
                 "pondernet_backward"):
        assert callable(getattr(ext, name))


def test_cuda_backend_not_listed_without_gpu():
    import torch
    import act_kernels as ak
    if torch.cuda.is_available():
        pytest.skip("a GPU is present")
    assert "cuda" not in ak.available_backends()
