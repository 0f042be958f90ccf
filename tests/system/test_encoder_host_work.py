"""Host work of a training ponder step of the per-token encoder (design §9,
§11), counted, not timed: the ATen calls that forward + backward issue per
ponder step, against nn.TransformerEncoderLayer's forward + backward, with
every token running every step (so both compute the same rows). Kernel
launches count as one event each (what runs inside a launcher is muted: on a
GPU it is one kernel). The budget: at most 1.3 times the plain layer's calls
per ponder step, on the kernel path (Triton attention and halting) and on
the CPU path ("auto": torch's CPU flash attention and the extension's
halting step)."""
import collections

import pytest
import torch
from torch import nn

import act_kernels as ak
from act_kernels.backends import cuda_extension_error
from census import SYNCS, census_of

BUDGET = 1.3
STEPS = 8


CPU_PATH = pytest.mark.skipif(torch.cuda.is_available() or bool(cuda_extension_error()),
                              reason="the CPU path: a CPU run with the extension built")


@pytest.mark.parametrize("backend,norm_first", [
    ("triton", False),
    pytest.param("triton", True, marks=pytest.mark.slow),   # the same kernels as post_norm, under the interpreter
    pytest.param("auto", False, marks=CPU_PATH),
    pytest.param("auto", True, marks=CPU_PATH),
], ids=["triton-post_norm", "triton-pre_norm", "cpu-post_norm", "cpu-pre_norm"])
def test_training_step_aten_calls_within_budget(backend, norm_first, monkeypatch):
    if backend == "triton":
        pytest.importorskip("triton")
    import act_kernels.ops.act.cpu_kernels as act_cpu
    import act_kernels.ops.act.triton_kernels as act_triton
    import act_kernels.ops.attention.triton_kernels as attention_triton

    device = "cuda" if torch.cuda.is_available() else "cpu"
    torch.manual_seed(0)
    layer = nn.TransformerEncoderLayer(64, 4, 128, dropout=0.0, batch_first=True, norm_first=norm_first).to(device)
    enc = ak.nn.ACTTransformerEncoder(layer, max_steps=STEPS, halting_bias_init=-40.0, backend=backend).to(device)
    # two sequences of 16 tokens: the counts do not depend on the batch or the length (the same
    # at 4 x 32), and the Triton rows run under the interpreter on a CPU (25 s at 4 x 32, 5 s here)
    x = torch.randn(2, 16, 64, device=device, requires_grad=True)

    def act():
        y = enc(x)
        (y.sum() + enc.ponder_cost.sum()).backward()

    def plain():
        layer(x).sum().backward()

    launchers = [(attention_triton, "attention_forward"), (attention_triton, "attention_backward"),
                 (act_triton, "halting_step"), (act_triton, "combine_backward"), (act_cpu, "halting_step"),
                 (act_cpu, "combine_backward")]
    act_events = census_of(act, launchers, monkeypatch)
    assert int(enc.steps.min()) == STEPS   # every token ran every step: equal rows
    plain_events = census_of(plain, [], monkeypatch)
    per_step = len(act_events) / STEPS
    counts = collections.Counter(act_events)
    assert counts["LAUNCH halting_step"] == STEPS and counts["LAUNCH combine_backward"] == 1, counts
    if backend == "triton":
        assert counts["LAUNCH attention_forward"] == counts["LAUNCH attention_backward"] == STEPS, counts
    # one device read per ponder step (the survivor count), none in the backward (the call's one read of
    # cu_seqlens is a tolist, which the census does not see)
    assert sum(counts[s] for s in SYNCS) == STEPS and counts["nonzero"] == STEPS, counts
    assert per_step <= BUDGET * len(plain_events), (per_step, len(plain_events), counts.most_common(12))
