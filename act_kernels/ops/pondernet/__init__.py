"""PonderNet's two kernel contracts (DESIGN §10): the fused halting step and
the packed backward of p and kl, as reference twins (`reference`), Triton
kernels (`triton_kernels`), the CUDA extension's launchers (`cuda_kernels`)
and torch.library ops (`library`)."""
from __future__ import annotations

from typing import Callable, NamedTuple


class PonderNetKernels(NamedTuple):
    halting_step: Callable
    halting_backward: Callable


def get_kernels(backend: str) -> PonderNetKernels:
    """The (halting_step, halting_backward) pair of a kernel backend."""
    if backend == "triton":
        from . import triton_kernels as mod
    elif backend == "cuda":
        from . import cuda_kernels as mod
    elif backend == "twins":  # the reference twins on the kernel driver, for tests
        from . import reference as mod
    else:
        raise ValueError(f"no PonderNet kernels for backend {backend!r}")
    return PonderNetKernels(mod.halting_step, mod.halting_backward)
