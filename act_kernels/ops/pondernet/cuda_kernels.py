"""The CUDA extension's PonderNet kernels (csrc/pondernet/) behind the two
contracts of `act_kernels.ops.pondernet.reference`, with the same signatures.
The extension takes raw pointers, so every tensor is checked and made
contiguous where the kernels need it here."""
from __future__ import annotations

import math

import torch

from ..extension import DTYPE_CODES, check_device, extension, stream
from ..launch import device_constants, WriteBack, dense, on_device, unit_columns
from ..ragged import rows_by_batch


def halting_step(state, active, weight, bias, unhalted, steps, uniform, step, max_steps, mode, eps, threshold):
    """CUDA twin of `act_kernels.ops.pondernet.reference.halting_step`."""
    ext = extension()
    device, acc = state.device, unhalted.dtype
    num_active, hidden = state.shape
    if state.dtype not in DTYPE_CODES:
        raise TypeError(f"state dtype {state.dtype} is not supported")
    state = unit_columns(state)
    for name, t in (("active", active), ("weight", weight), ("bias", bias), ("unhalted", unhalted),
                    ("steps", steps)):
        check_device(name, t, device)
    weight = weight.to(acc).contiguous()
    bias = bias.to(acc).contiguous()
    active = active.contiguous()
    limits = device_constants((float(eps), float(threshold)), acc, device)
    p = torch.empty(num_active, dtype=acc, device=device)
    lam = torch.empty(num_active, dtype=acc, device=device)
    u_before = torch.empty(num_active, dtype=acc, device=device)
    halted = torch.empty(num_active, dtype=torch.bool, device=device)
    if num_active == 0:
        return p, lam, u_before, halted
    if mode == 1:
        uniform = uniform.to(acc).contiguous()
        check_device("uniform", uniform, device)
    out = WriteBack(unhalted=unhalted, steps=steps)
    with on_device(device):
        ext.pondernet_step(
            state.data_ptr(), state.stride(0), active.data_ptr(), weight.data_ptr(), bias.data_ptr(),
            out["unhalted"].data_ptr(), out["steps"].data_ptr(), uniform.data_ptr() if mode == 1 else 0,
            limits.data_ptr(), p.data_ptr(), lam.data_ptr(), u_before.data_ptr(), halted.data_ptr(),
            num_active, hidden, int(step), int(max_steps), int(mode), DTYPE_CODES[state.dtype], stream(device),
        )
    out.finish()
    return p, lam, u_before, halted


def halting_backward(p, lam, u_before, batch_index, step_index, steps, grad_p, grad_kl, prior):
    """CUDA twin of `act_kernels.ops.pondernet.reference.halting_backward`."""
    ext = extension()
    device, acc = p.device, p.dtype
    gz = torch.empty_like(p)
    if p.numel() == 0:
        return gz
    steps = dense(steps)
    order, first = rows_by_batch(dense(batch_index), steps)
    logs = device_constants((math.log(prior), math.log1p(-prior)), acc, device)
    tensors = [t.to(acc).contiguous() for t in (lam, u_before, grad_p, grad_kl)]
    for name, t in (("lam", tensors[0]), ("u_before", tensors[1]), ("grad_p", tensors[2]),
                    ("grad_kl", tensors[3]), ("steps", steps)):
        check_device(name, t, device)
    p = dense(p)
    with on_device(device):
        ext.pondernet_backward(
            order.data_ptr(), first.data_ptr(), steps.data_ptr(), p.data_ptr(),
            tensors[0].data_ptr(), tensors[1].data_ptr(), tensors[2].data_ptr(), tensors[3].data_ptr(),
            logs.data_ptr(), gz.data_ptr(), steps.shape[0], DTYPE_CODES[acc], stream(device),
        )
    return gz
