"""Fused recurrent-cell gates for the ACT layers: the pointwise part of a GRU
and an LSTM step, with the input projection hoisted out of the ponder loop
(the layer computes x W_ih^T once per time step; a ponder step adds only the
hidden projection h W_hh^T and these gates, which run in the same launch as
the halting step: `GateStep`). Reference twins
(`reference`), Triton kernels (`triton_kernels`), the CUDA extension's
launchers (`cuda_kernels`) and the autograd Functions (`function`)."""
from .function import GateStep, gru_gates, lstm_gates

__all__ = ["GateStep", "gru_gates", "lstm_gates"]
