"""ACT's two kernel contracts (DESIGN §3): the fused halting step and the
combine backward, as reference twins (`reference`), Triton kernels
(`triton_kernels`), the CUDA extension's launchers (`cuda_kernels`) and
torch.library ops (`library`)."""
from __future__ import annotations

from ...driver import Kernels


def get_kernels(backend: str) -> Kernels:
    """The (halting_step, combine_backward) pair of a kernel backend."""
    if backend == "triton":
        from . import triton_kernels as mod
    elif backend == "cuda":
        from . import cuda_kernels as mod
    elif backend == "twins":  # the reference twins on the kernel driver (tests, the layers' CPU path)
        from . import reference as mod
    else:
        raise ValueError(f"no kernels for backend {backend!r}")
    return Kernels(mod.halting_step, mod.combine_backward)
