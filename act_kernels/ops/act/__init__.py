"""ACT (Graves 2016) on the ragged layout (design §1-§3), read top-down:

    function.py        `ponder` (the public function), the kernel loop and
                       its autograd Function `_RaggedCombine`
    reference.py       the oracle `ponder` and the reference twins of the two
                       kernel contracts (the fused halting step, the combine
                       backward)
    triton_kernels.py  the Triton kernels and their launchers
    cuda_kernels.py    the launchers of the CUDA extension's kernels
    cpu_kernels.py     the extension's halting step on the CPU
    library.py         the torch.library ops
"""
from ..output import HaltingProbs, PonderOutput
from .function import Kernels, get_kernels, kernel_ponder_loop, ponder, ragged_ponder

__all__ = ["ponder", "PonderOutput", "HaltingProbs", "Kernels", "get_kernels", "ragged_ponder", "kernel_ponder_loop"]
