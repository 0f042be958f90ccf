"""Host work of a ponder step of `LoopedCausalLM`'s block (design §11, §15),
counted, not timed: the ATen calls one ponder step issues (the block's call
over its 8 steps, divided by 8), against the same transformers decoder
layers' own forward on the same rows (the model's rotary embedding once,
then each layer with its own attention, sdpa, causal, no mask), with every
token running every step so both compute the same rows. Forward (no_grad)
and forward + backward. Kernel launches count as one event each (what runs
inside a launcher is muted). The budget: at most 1.3 times the plain
layers' calls per ponder step.

Both paths take the pool path (layers/token_ponder.py: one fixed key/value
row per token per layer, written in place) and meet it. The CPU path
("auto": torch's CPU flash attention over the pool, the C++ halting step):
96.75 calls per ponder step forward against 84 (1.15x), 288.4 against 247
forward + backward (1.17x). The kernel path ("triton", under the
interpreter on a CPU: slow, outside the default suite): 92.0 against 84
(1.10x) and 270.1 against 247 (1.09x), one attention launch per layer and
one device read per step.
"""
import collections

import pytest
import torch

from census import SYNCS, census_of

transformers = pytest.importorskip("transformers")

BUDGET = 1.3
STEPS = 8
BATCH, LENGTH, HIDDEN = 4, 32, 64


class OverBudget(AssertionError):
    """The ponder step issues more than BUDGET times the plain layers' calls."""


def tiny_llama():
    torch.manual_seed(0)
    config = transformers.LlamaConfig(vocab_size=61, hidden_size=HIDDEN, intermediate_size=128, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                                      max_position_embeddings=128)
    return transformers.LlamaForCausalLM(config).eval()


@pytest.mark.parametrize("backend,grad", [
    ("auto", False),
    ("auto", True),
    pytest.param("triton", False, marks=pytest.mark.slow),
    pytest.param("triton", True, marks=pytest.mark.slow),
], ids=["cpu-forward", "cpu-forward_backward", "triton-forward", "triton-forward_backward"])
def test_looped_block_ponder_step_aten_calls_within_budget(backend, grad, monkeypatch):
    if backend == "triton":
        pytest.importorskip("triton")
    import act_kernels.ops.act.cpu_kernels as act_cpu
    import act_kernels.ops.act.triton_kernels as act_triton
    import act_kernels.ops.attention.triton_kernels as attention_triton
    from act_kernels.hf import LoopedCausalLM
    from act_kernels.hf.attention import ours

    model = tiny_llama()
    looped = LoopedCausalLM(model, block=(0, 2), max_steps=STEPS, halting_bias_init=-40.0, backend=backend)
    x = torch.randn(BATCH, LENGTH, HIDDEN, requires_grad=grad)
    cu = torch.arange(0, BATCH * LENGTH + 1, LENGTH, dtype=torch.int32)
    positions = torch.arange(LENGTH).repeat(BATCH)

    def act():
        with torch.set_grad_enabled(grad), ours(model.config):
            y = looped.block.forward_packed(x.reshape(-1, HIDDEN), cu, is_causal=True, max_seqlen=LENGTH,
                                            positions=positions)
            if grad:
                (y.sum() + looped.block.ponder_cost.sum()).backward()

    def plain():
        with torch.set_grad_enabled(grad):
            h = x
            rotary = model.model.rotary_emb(h, torch.arange(LENGTH)[None].expand(BATCH, LENGTH))
            for layer in model.model.layers:
                h = layer(h, attention_mask=None, position_embeddings=rotary)
                h = h[0] if isinstance(h, tuple) else h
            if grad:
                h.sum().backward()

    launchers = [(attention_triton, "attention_forward"), (attention_triton, "attention_backward"),
                 (act_triton, "halting_step"), (act_triton, "combine_backward"), (act_cpu, "halting_step"),
                 (act_cpu, "combine_backward")]
    act_events = census_of(act, launchers, monkeypatch)
    assert int(looped.block.steps.min()) == STEPS   # every token ran every step: equal rows
    plain_events = census_of(plain, [], monkeypatch)
    assert "_scaled_dot_product_flash_attention_for_cpu" in plain_events or torch.cuda.is_available()
    counts = collections.Counter(act_events)
    if backend == "triton":
        assert counts["LAUNCH halting_step"] == STEPS and counts["LAUNCH attention_forward"] == 2 * STEPS, counts
        assert counts["LAUNCH attention_backward"] == (2 * STEPS if grad else 0), counts
        # one device read per ponder step: the survivor count
        assert sum(counts[s] for s in SYNCS) == STEPS and counts["nonzero"] == STEPS, counts
    per_step = len(act_events) / STEPS
    if per_step > BUDGET * len(plain_events):
        raise OverBudget(f"{per_step} ATen calls per ponder step against {len(plain_events)} "
                         f"({per_step / len(plain_events):.2f}x): {counts.most_common(12)}")
