"""Fused recurrent-cell gates for the ACT layers: the pointwise part of a GRU
and an LSTM step, with the input projection hoisted out of the ponder loop
(the layer computes x W_ih^T once per time step; a ponder step adds only the
hidden projection h W_hh^T and these gates, which run in the same launch as
the halting step). Reference twins (`reference`), Triton kernels
(`triton_kernels`), the CUDA extension's launchers (`cuda_kernels`), the
CPU kernels (`cpu_kernels`), the gates' autograd Functions (`function`), and
a cell's whole ponder as one autograd Function (`ponder`)."""
from .function import gate_kernels, gru_gates, lstm_gates
from .ponder import cell_ponder

__all__ = ["cell_ponder", "gate_kernels", "gru_gates", "lstm_gates"]
