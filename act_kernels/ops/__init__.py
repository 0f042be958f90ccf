"""The kernel library, one folder per op family (DESIGN §12):

    act/        the ACT halting step and combine backward (reference twins,
                Triton, CUDA launcher, torch.library ops)
    attention/  ragged attention over a subset of packed queries (reference
                twin, Triton forward and backward, autograd Function, op)
    ragged.py   index helpers for the packed, step-major layout

Which backend serves a call is decided in `act_kernels.backends`.
"""
