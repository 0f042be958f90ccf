"""The kernel library, one folder per op family (design §12):

    act/        the ACT halting step and combine backward (reference twins,
                Triton, CUDA launcher, torch.library ops)
    attention/  ragged attention over a subset of packed queries (reference
                twin, Triton forward and backward, autograd Function, op)
    cells/      the ACT GRU/LSTM layers' fused gates, alone and with the
                halting step (reference twins, Triton, CUDA and CPU kernels),
                and a cell's whole ponder as one autograd Function
    pondernet/  PonderNet's halting step and backward (twins, Triton, CUDA, ops)
    ragged.py   index helpers for the packed, step-major layout
    launch.py   what every launcher does to strides, devices and constants

Which backend serves a call is decided in `act_kernels.backends`.
"""
