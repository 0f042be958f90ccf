"""PonderNet (Banino et al. 2021) on the ragged layout (design §10), read top-down:

    function.py        `pondernet` and `pondernet_loss` (the public functions),
                       the kernel loop and its autograd Function `_Halting`
    output.py          what `pondernet` returns
    prior.py           the truncated geometric prior and the KL term
    reference.py       the oracle `pondernet` and the reference twins of the
                       two kernel contracts (the fused halting step, the
                       packed backward of p and kl)
    triton_kernels.py  the Triton kernels and their launchers
    cuda_kernels.py    the launchers of the CUDA extension's kernels
    library.py         the torch.library ops
    checks.py          the argument checks

    out = ak.pondernet(step_fn, state, weight, bias, max_steps=20, prior=0.2)
    loss = ak.pondernet_loss(out, per_step_loss, beta=0.01)
"""
from .output import PonderNetOutput
from .function import (PonderNetKernels, get_kernels, kernel_pondernet_loop, pondernet, pondernet_loss,
                     ragged_pondernet)

__all__ = ["pondernet", "pondernet_loss", "PonderNetOutput", "PonderNetKernels", "get_kernels", "ragged_pondernet",
           "kernel_pondernet_loop"]
