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
                 "pondernet_backward", "cell_gates"):
        assert callable(getattr(ext, name))


@pytest.mark.parametrize("gpu,built,listed", [(False, True, False), (True, False, False), (True, True, True)])
def test_cuda_backend_listed_only_with_gpu_and_extension(monkeypatch, gpu, built, listed):
    """available_backends() lists "cuda" exactly when a GPU is present and the
    extension imports, whatever this machine has."""
    import torch

    import act_kernels as ak
    from act_kernels import backends

    monkeypatch.setattr(torch.cuda, "is_available", lambda: gpu)
    monkeypatch.setattr(backends, "cuda_extension_error", lambda: "" if built else "not built")
    assert ("cuda" in ak.available_backends()) == listed
